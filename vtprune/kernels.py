"""Fused GPU kernels for the shared building blocks, each an exact stand-in for its torch code, which stays the
reference and the fallback.

:func:`greedy_on_matrix`: the whole loop of :func:`vtprune.ops.greedy` over a precomputed [V, V] similarity matrix
as ONE Triton launch (:mod:`vtprune.triton_greedy`) instead of ~7 small kernels per pick, which leave a GPU at batch 1
waiting on the host. Same picks bit for bit (ties included). It runs when ``VTPRUNE_TRITON`` is not ``"0"``, the
matrix is on a CUDA device (or ``TRITON_INTERPRET=1`` was set before Triton's import: Triton's interpreter runs it on
CPU tensors, for tests), V <= :data:`MAX_TOKENS`, the matrix is float32 / bf16 / fp16 with unit last stride and the
weight vector float32. A failure to import Triton, compile or launch warns once with the reason, is kept in
:func:`status` and turns the kernel off for the process: the torch loop runs instead.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import warnings
from typing import Any

import torch

from .errors import VTPruneError

#: the largest token count the one-program kernel holds in registers (V rounded up to a power of two)
MAX_TOKENS = 16384
#: ``"0"``: always the torch loop; ``"1"`` (default): the kernel where it applies
ENV = "VTPRUNE_TRITON"
#: score forms: ``weight · (1 - maxsim)`` (or ``1 - maxsim``), ``relevance - penalty · maxsim``
FARTHEST, MARGINAL = "farthest", "marginal"
#: rounding code of the kernel per similarity dtype (see vtprune.triton_greedy.ROUND)
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MODE = {FARTHEST: 0, MARGINAL: 1}
_state: dict[str, Any] = {"failure": None, "launches": 0}


def enabled() -> bool:
    """Whether ``VTPRUNE_TRITON`` allows the kernel (unset: yes)."""
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1"):
        raise VTPruneError(f"{ENV}={value!r}: expected '0' (always the torch loop) or '1' (default: the Triton "
                           "kernel where it applies)")
    return value == "1"


def status() -> dict[str, Any]:
    """What the GPU report records: whether the kernel is allowed, the installed Triton's version (not imported),
    the failure that turned it off (None if none), and how many greedy loops it ran in this process."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    return {"enabled": enabled(), "triton": version, "interpreter": _interpreting(),
            "failure": _state["failure"], "launches": _state["launches"]}


def launches() -> int:
    """How many greedy loops the kernel ran in this process."""
    return _state["launches"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported(sim: torch.Tensor, k: int, vec: torch.Tensor | None) -> str | None:
    """Why the kernel does not apply to these inputs (None: it does); independent of the process's state."""
    if sim.device.type != "cuda" and not _interpreting():
        return f"the matrix is on {sim.device.type}, not CUDA"
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or sim.stride(1) != 1:
        return f"not a square matrix with unit last stride (shape {tuple(sim.shape)}, strides {sim.stride()})"
    if not 1 <= sim.shape[0] <= MAX_TOKENS or k < 1:
        return f"{sim.shape[0]} tokens, k = {k}: expected 1..{MAX_TOKENS} tokens and k >= 1"
    if sim.dtype not in _ROUND:
        return f"similarity dtype {sim.dtype}"
    if vec is not None and (vec.dtype != torch.float32 or vec.shape != sim.shape[:1] or vec.device != sim.device):
        return f"weights of dtype {vec.dtype}, shape {tuple(vec.shape)} on {vec.device}"
    return None


def greedy_on_matrix(sim: torch.Tensor, k: int, first: torch.Tensor | int, form: str,
                     vec: torch.Tensor | None = None, penalty: float = 0.0) -> torch.Tensor | None:
    """:func:`vtprune.ops.greedy`'s k picks [k] (int64) over ``sim`` (row j: token j against all) with the step
    score ``form`` (:data:`FARTHEST` with weight ``vec`` or none, :data:`MARGINAL` with relevance ``vec`` and
    ``penalty``), from one kernel launch; None where the kernel is off or does not apply (the caller runs the
    torch loop)."""
    if form not in _MODE:
        raise VTPruneError(f"greedy_on_matrix: score form {form!r}; expected one of {sorted(_MODE)}")
    if _state["failure"] is not None or not enabled() or unsupported(sim, k, vec) is not None:
        return None
    picks = torch.empty(k, dtype=torch.long, device=sim.device)
    start = torch.as_tensor(first, dtype=torch.long, device=sim.device).reshape(1)
    block = max(16, 1 << (sim.shape[0] - 1).bit_length())
    try:
        from .triton_greedy import greedy_kernel

        with torch.cuda.device(sim.device) if sim.device.type == "cuda" else contextlib.nullcontext():
            greedy_kernel[(1,)](sim, sim.stride(0), sim if vec is None else vec.contiguous(), start, picks,
                                float(penalty), sim.shape[0], k, BLOCK=block, MODE=_MODE[form],
                                HAS_VEC=vec is not None, ROUND=_ROUND[sim.dtype], enable_fp_fusion=False,
                                num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
    except Exception as e:  # noqa: BLE001 - import, compile or launch: any failure falls back, loudly, once
        _state["failure"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"vtprune: the Triton greedy kernel is off for this process ({_state['failure']}); "
                      f"the torch loop runs instead", RuntimeWarning, stacklevel=2)
        return None
    _state["launches"] += 1
    return picks
