"""Does measured prefill time follow FLOPs? CPU, one thread, the ``bench-small`` random-weight LLaVA-style model.

Runs the unpruned model and uniform pruning at keep 0.5 / 0.25 / 0.11, before the LLM and inside it at K=2, all
interleaved, and prints measured prefill speedup ÷ FLOPs-bound speedup (target >= 0.9) as a Markdown table.

    python bench/prefill_speedup.py --repeats 5 --warmup 1 --json results/prefill_speedup.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from vtprune.benchmark import BenchResult, Setting, build_model, run_bench, si_flops, synthetic_inputs
from vtprune.registry import make_config

KEEPS = (0.5, 0.25, 0.11)


def settings(pruner: str, layer: int) -> list[Setting]:
    """Unpruned, then pre-LLM and in-LLM (layer K) pruning at every keep ratio."""
    pre = [Setting(make_config(pruner, keep=k)) for k in KEEPS]
    inside = [Setting(make_config(pruner, keep=k, site="layer", layer=layer)) for k in KEEPS]
    return [Setting(None), *pre, *inside]


def markdown(result: BenchResult) -> str:
    """The result as a Markdown table."""
    lines = [("| setting | visual tokens | FastV FLOPs | exact FLOPs | prefill ms | measured speedup "
              "| FLOPs-bound speedup | measured ÷ bound | selection share | KV cache | peak memory |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.results:
        measured, bound = result.speedups(r)
        lines.append(f"| {r.setting.label} | {r.visual[1]} / {r.visual[0]} | {si_flops(r.flops.fastv)} "
                     f"| {si_flops(r.flops.prefill_total)} | {r.prefill_ms:.0f} | {measured:.2f}× | {bound:.2f}× "
                     f"| **{measured / bound:.3f}** | {100 * r.overhead_share:.2f} % "
                     f"| {r.prefill[-1].kv_bytes / 2 ** 20:.1f} MiB | {_mib(r.peak_bytes)} |")
    return "\n".join(lines)


def _mib(n: int | None) -> str:
    """Bytes as MiB, or n/a."""
    return "n/a" if n is None else f"{n / 2 ** 20:.0f} MiB"


def main() -> None:
    """Parse options, run, print the table (and write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-small")
    parser.add_argument("--pruner", default="uniform")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(args.model, random_weights=True)
    inputs = synthetic_inputs(model.config)
    result = run_bench(model, inputs, settings(args.pruner, args.layer), repeats=args.repeats, warmup=args.warmup)
    env = result.env
    print(f"{args.model}: {inputs['input_ids'].shape[1]} prompt tokens; {env['cpu']} ({env['cpu_count']} cores), "
          f"{env['torch_threads']} thread(s), {env['dtype']}, attn={env['attn_implementation']}, torch {env['torch']}, "
          f"transformers {env['transformers']}, {platform.python_version()}; median of {args.repeats} after "
          f"{args.warmup} warm-up, interleaved\n")
    print(markdown(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result.as_dict(), "args": vars(args) | {"json": str(args.json)}}, indent=2))


if __name__ == "__main__":
    main()
