"""The one-launch Triton greedy kernel (``vtprune.kernels``) against the torch loop of ``ops.greedy`` over many inputs
(issue 20): every score form the methods use (max-min, SADS, MMR at two λ), float32 / bf16 / fp16 similarity
matrices, with and without duplicated tokens (exact ties), k = 1, 2, 64, 640 and V, V from 1 to 16,384; then the
negative control (the kernel without its bf16 rounding must pick differently) and the kernel's own time per size.
Runs on a CUDA machine, or on the CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter: small sizes only).

    python bench/greedy_stress.py --json out.json                                   # CUDA (docs/benchmarks.md)
    TRITON_INTERPRET=1 python bench/greedy_stress.py --device cpu --sizes 2,37 --seeds 1 --controls 1 --control-tokens 80
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from vtprune import kernels, ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZES = (1, 2, 37, 100, 576, 1000, 2928, 16384)
#: picks per case (those above V dropped); k = V too where V <= this
FULL_UP_TO = 1000
PICKS = (1, 2, 64, 640)


def run_greedy(column: ops.SimColumn, tokens: int, k: int, first: torch.Tensor | int, score: ops.StepScore,
               device: torch.device) -> tuple[torch.Tensor, float, bool]:
    """``ops.greedy``'s picks, its wall time in ms (the device synchronised before and after) and whether the
    kernel ran (a launch was counted)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    launches = kernels.launches()
    sync()
    t = time.perf_counter()
    picks = ops.greedy(column, tokens, k, first, score, device)
    sync()
    return picks, 1e3 * (time.perf_counter() - t), kernels.launches() > launches


def unit_features(tokens: int, dim: int, duplicated: bool, generator: torch.Generator, device: str) -> torch.Tensor:
    """Random bf16 features [tokens, dim] (a model's dtype); duplicated: drawn from tokens // 7 distinct rows."""
    distinct = max(1, tokens // 7) if duplicated else tokens
    base = torch.randn(distinct, dim, generator=generator)
    rows = torch.randint(0, distinct, (tokens,), generator=generator) if duplicated else torch.arange(tokens)
    return base[rows].to(device=device, dtype=torch.bfloat16)


def scores(features: torch.Tensor, generator: torch.Generator) -> list[tuple[str, ops.StepScore, torch.Tensor | int]]:
    """(name, step score, first pick) of every score form: max-min, SADS (random sensitivity), MMR (norm
    importance) at λ = 0.5 and 0.3."""
    tokens = features.shape[0]
    imp = ops.min_max(features.float().norm(dim=-1), eps=1e-6)
    sens = ops.min_max(torch.rand(tokens, generator=generator).to(features.device), eps=1e-8, constant=1.0)
    return [("max-min", ops.Farthest(), tokens // 3), ("sads", ops.Farthest(sens), sens.argmax()),
            ("mmr 0.5", ops.Marginal(0.5 * imp, 0.5), imp.argmax()),
            ("mmr 0.3", ops.Marginal(0.3 * imp, 1 - 0.3), imp.argmax())]


def stress(sizes: Sequence[int], dtypes: Sequence[str], seeds: int, device: str) -> dict[str, Any]:
    """Every case: the kernel's picks (``ops.from_matrix``) against the torch loop's (the same columns as a plain
    function); a case where the kernel did not run counts as a mismatch."""
    out: dict[str, Any] = {"cases": 0, "mismatches": []}
    for tokens, duplicated, seed in ((v, d, s) for v in sizes for d in (False, True) for s in range(seeds)):
        gen = torch.Generator().manual_seed(seed)
        features = unit_features(tokens, 64, duplicated, gen, device)
        for dtype in dtypes:
            unit = ops.unit_rows(features, DTYPES[dtype])
            matrix = ops.from_matrix(unit @ unit.T)
            for name, score, first in scores(features, gen):
                for k in sorted({p for p in PICKS if p <= tokens} | ({tokens} if tokens <= FULL_UP_TO else set())):
                    fused, _, ran = run_greedy(matrix, tokens, k, first, score, unit.device)
                    plain = run_greedy(matrix.__call__, tokens, k, first, score, unit.device)[0]
                    out["cases"] += 1
                    if not ran or not torch.equal(fused, plain):
                        out["mismatches"].append({"tokens": tokens, "duplicated": duplicated, "seed": seed,
                                                  "dtype": dtype, "score": name, "k": k, "kernel_ran": ran})
        print(f"[greedy_stress] V={tokens} duplicated={duplicated}: {out['cases']} cases, "
              f"{len(out['mismatches'])} mismatches", flush=True)
    return out


def launch(sim: torch.Tensor, k: int, first: int, mode: int, rounding: int, vec: torch.Tensor | None = None,
           penalty: float = 0.0) -> torch.Tensor:
    """The kernel launched with explicit settings (``vtprune.triton_greedy``'s MODE and ROUND codes), bypassing the
    dispatch: the negative controls launch deliberately wrong variants with it."""
    from vtprune import triton_greedy as tg

    picks = torch.empty(k, dtype=torch.long, device=sim.device)
    tg.greedy_kernel[(1,)](sim, sim.stride(0), sim if vec is None else vec, torch.tensor([first], device=sim.device),
                           picks, penalty, sim.shape[0], k, BLOCK=1 << (sim.shape[0] - 1).bit_length(), MODE=mode,
                           HAS_VEC=vec is not None, ROUND=rounding)
    return picks


def negative_control(trials: int, tokens: int, device: str) -> dict[str, int]:
    """On how many of ``trials`` random bf16 matrices the max-min kernel WITHOUT rounding ``1 - maxsim`` to bf16
    (torch rounds there) picks differently (all, if rounding matters) while the real kernel matches the torch loop
    (all)."""
    from vtprune.triton_greedy import FARTHEST, NO_ROUNDING

    differs = same = 0
    for seed in range(trials):
        unit = ops.unit_rows(unit_features(tokens, 64, False, torch.Generator().manual_seed(100 + seed), device),
                             torch.bfloat16)
        matrix = ops.from_matrix(unit @ unit.T)
        k = min(320, tokens - 1)
        want = run_greedy(matrix.__call__, tokens, k, 5, ops.Farthest(), unit.device)[0]
        differs += not torch.equal(launch(matrix.matrix, k, 5, FARTHEST, NO_ROUNDING), want)
        same += torch.equal(run_greedy(matrix, tokens, k, 5, ops.Farthest(), unit.device)[0], want)
    return {"trials": trials, "unrounded_differs": differs, "kernel_matches": same}


def kernel_times(sizes: Sequence[int], device: str, repeats: int = 5) -> list[dict[str, Any]]:
    """Median time of the kernel alone (max-min, float32) per size at k = 64 and 640 (those below V)."""
    rows = []
    for tokens in sizes:
        unit = ops.unit_rows(torch.randn(tokens, 64, device=device))
        matrix = ops.from_matrix(unit @ unit.T)
        for k in (k for k in (64, 640) if k < tokens):
            ms = sorted(run_greedy(matrix, tokens, k, 0, ops.Farthest(), unit.device)[1] for _ in range(repeats + 1))
            rows.append({"tokens": tokens, "k": k, "kernel_ms": ms[len(ms) // 2]})
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the stress cases, the negative control and the kernel timings; print a summary, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--controls", type=int, default=20, help="negative-control trials")
    parser.add_argument("--control-tokens", type=int, default=576, help="tokens of each negative-control matrix")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]
    if kernels.unsupported(torch.eye(2, device=args.device), 1, None):
        raise SystemExit(f"the kernel does not run here: {kernels.unsupported(torch.eye(2, device=args.device), 1, None)}"
                         " (a CUDA device, or TRITON_INTERPRET=1 with --device cpu)")
    start = time.monotonic()
    report = {"stress": stress(sizes, args.dtypes.split(","), args.seeds, args.device),
              "negative": negative_control(args.controls, args.control_tokens, args.device),
              "kernel_times": kernel_times(sizes, args.device), "kernel": kernels.status()}
    report |= {"seconds": time.monotonic() - start, "torch": torch.__version__}
    s, neg = report["stress"], report["negative"]
    print(f"[greedy_stress] {s['cases'] - len(s['mismatches'])} of {s['cases']} cases with the same picks; negative "
          f"control: unrounded variant differs on {neg['unrounded_differs']} of {neg['trials']}, the kernel matches "
          f"on {neg['kernel_matches']}; {report['kernel']}")
    for row in report["kernel_times"]:
        print(f"[greedy_stress] kernel alone, V={row['tokens']} k={row['k']}: {row['kernel_ms']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
