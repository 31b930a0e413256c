"""The whole greedy selection loop of :func:`vtprune.ops.greedy` over a precomputed similarity matrix as ONE Triton
kernel launch (one program; the running max similarity, the chosen mask and the weights live in registers). Imported
only by :mod:`vtprune.kernels` when the kernel is about to run, so that ``import vtprune`` never imports Triton.

Each step reproduces the torch loop's arithmetic bit for bit: the similarity row of the last pick is loaded (in the
matrix's dtype, upcast exactly to float32), ``maxsim`` is its running maximum, the score is rounded to the matrix's
dtype where torch's is (``1 - maxsim`` and ``penalty · maxsim`` are computed in float32 and rounded to a bf16/fp16
matrix's dtype, as torch's opmath does), chosen tokens score ``-inf`` and the argmax takes the lowest index on ties.
Launched with ``enable_fp_fusion=False``: ``relevance - penalty · maxsim`` must not become a fused multiply-add,
which torch's two separate kernels never form. Not matched: scores with NaN (non-finite features).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: MODE: ``weight · (1 - maxsim)`` (without a weight ``1 - maxsim``), or ``relevance - penalty · maxsim``
FARTHEST, MARGINAL = 0, 1
#: ROUND: how a float32 intermediate is rounded to the similarity matrix's dtype
NO_ROUNDING, TO_BF16, TO_FP16 = 0, 1, 2


def _greedy_body(sim_ptr, stride, vec_ptr, first_ptr, picks_ptr, penalty, num_tokens, k,
                 BLOCK: tl.constexpr, MODE: tl.constexpr, HAS_VEC: tl.constexpr, ROUND: tl.constexpr):
    """picks[0] = first; picks[t] = argmax over unchosen tokens of the step score of the running max similarity.
    bf16 rounding by integer ops (round to nearest even): Triton's interpreter truncates a float32 -> bf16 cast
    where the GPU rounds; the integer form is the same on both."""
    offs = tl.arange(0, BLOCK)
    valid = offs < num_tokens
    if HAS_VEC:
        vec = tl.load(vec_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    j = tl.load(first_ptr).to(tl.int32)
    tl.store(picks_ptr, j.to(tl.int64))
    chosen = offs == j
    maxsim = tl.full([BLOCK], float("-inf"), tl.float32)
    for t in range(1, k):
        row = tl.load(sim_ptr + j * stride + offs, mask=valid, other=0.0).to(tl.float32)
        maxsim = tl.maximum(maxsim, row)
        if MODE == 0:
            x = 1.0 - maxsim
        else:
            x = penalty * maxsim
        if ROUND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        elif ROUND == 2:
            x = x.to(tl.float16).to(tl.float32)
        if MODE == 0:
            if HAS_VEC:
                x = vec * x
        else:
            x = vec - x
        x = tl.where(chosen | ~valid, float("-inf"), x)
        j = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int32)
        tl.store(picks_ptr + t, j.to(tl.int64))
        chosen = chosen | (offs == j)


#: compiled for the GPU, or run on CPU tensors by Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
#: Triton was imported (its own library functions, ``tl.argmax`` included, are wrapped at that import)
greedy_kernel = triton.jit(_greedy_body, do_not_specialize=["stride", "penalty", "num_tokens", "k"])
