"""Received attention (``ops.attention_transpose_apply``: Σ_q w_q·softmax(q kᵀ)) at Qwen2.5-VL's 2880-token view
(16 heads, 11,520 patches, d = 80) for several block sizes, against the form it had before (scale applied per
block, 64 MB blocks), timed on a slice of the query rows (the cost is linear in them) and scaled to all of them.
1 thread, medians of 3 after one warm-up; the max relative difference to the old form is printed with each.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/received_attention_blocks.py --queries 720
"""

from __future__ import annotations

import argparse
import time

import torch

from vtprune import ops
from vtprune.measure import median

HEADS, DIM = 16, 80


def old_form(query: torch.Tensor, key: torch.Tensor, scaling: float, weights: torch.Tensor,
             budget: int = 1 << 24) -> torch.Tensor:
    """The kernel before the scale was folded into the queries (the baseline of the comparison)."""
    heads, rows = query.shape[:2]
    key_t = key.float().transpose(-1, -2)
    out = torch.zeros(heads, key_t.shape[-1])
    step = ops.block_rows(key_t.shape[-1], heads, budget)
    for s in range(0, rows, step):
        e = torch.matmul(query[:, s:s + step].float(), key_t).mul_(scaling)
        e.sub_(e.amax(-1, keepdim=True)).exp_()
        out += torch.bmm((weights[:, s:s + step] / e.sum(-1))[:, None, :], e)[:, 0]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=720, help="query rows timed (of --keys)")
    parser.add_argument("--keys", type=int, default=11520)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(HEADS, args.queries, DIM, generator=g), torch.randn(HEADS, args.keys, DIM, generator=g)
    w, scale = torch.rand(HEADS, args.queries, generator=g), DIM ** -0.5
    ref = old_form(q, k, scale, w)
    rows = []
    for name, fn, budget in [("before", old_form, 1 << 24)] + [
            ("now", ops.attention_transpose_apply, b) for b in (1 << 25, 1 << 24, 1 << 23, 1 << 22, 1 << 21)]:
        fn(q, k, scale, w, budget)
        samples = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn(q, k, scale, w, budget)
            samples.append(time.perf_counter() - start)
        s = median(samples)
        rows.append({"form": name, "block_elements": budget, "seconds": s, "all_queries_s": s * args.keys / args.queries,
                     "max_rel_diff": float(((out - ref).abs() / ref.abs()).max())})
        r = rows[-1]
        print(f"{name:6s} block {budget:>9}: {s * 1e3:8.1f} ms for {args.queries} queries, {r['all_queries_s']:.2f} s "
              f"for all {args.keys}; max rel diff to before {r['max_rel_diff']:.1e}", flush=True)
    return rows


if __name__ == "__main__":
    main()
