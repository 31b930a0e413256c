"""Host work per prefill, the part a GPU at batch 1 waits on: top-level aten ops dispatched (≈ kernel launches) and
host syncs (``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``, ``int(t)``), plus every other read of device
values the host waits for on a GPU (``nonzero``: boolean-mask indexing, ``equal``, ``.tolist()``), unhooked vs pruned,
per method and site, on a tiny random-weight model with many decoder layers (the arithmetic is negligible, the op count is what
the real model would launch). Measured on the CPU: counts, not times, so they hold on any machine.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/host_ops.py --families llava_next,qwen2_vl --layers 32
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import vtprune
from vtprune.testing import random_image, tiny_vlm

#: (label, method, apply options): the settings of the GPU report, at their default sites
SETTINGS = (
    ("random pre_llm", "random", {"keep": 0.25}),
    ("divprune pre_llm", "divprune", {"keep": 0.25}),
    ("fastv K=2", "fastv", {"keep": 0.25, "site": "layer", "layer": 2}),
    ("dart K=2", "dart", {"keep": 0.25, "site": "layer", "layer": 2}),
    ("random K=2", "random", {"keep": 0.25, "site": "layer", "layer": 2}),
)
SYNC = "aten::_local_scalar_dense"
#: the other host reads of device values: ``nonzero`` (also inside boolean-mask indexing) and ``equal`` at any depth;
#: ``resolve_conj`` at top level is what ``Tensor.tolist()`` dispatches (a copy to the host on a GPU)
READS = "host reads"


def count_ops(model: torch.nn.Module, inputs: dict[str, Any]) -> collections.Counter:
    """Top-level aten ops (not nested in another aten op) of one cached prefill, after one warm-up call."""
    with torch.inference_mode():
        model(**inputs, use_cache=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(**inputs, use_cache=True)
    counts: collections.Counter = collections.Counter()
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        top = parent is None or not parent.name.startswith("aten::")
        if e.name == SYNC:
            counts[SYNC] += 1
        if e.name in (SYNC, "aten::nonzero", "aten::equal") or (top and e.name == "aten::resolve_conj"):
            counts[READS] += 1
        if top:
            counts[e.name] += 1
    return counts


def family_rows(family: str, layers: int) -> list[dict[str, Any]]:
    """Unhooked and every setting of :data:`SETTINGS` on ``family``'s tiny model with ``layers`` decoder layers."""
    tiny = tiny_vlm(family, num_layers=layers)
    inputs = tiny.inputs([tiny.prompt("how many")], [random_image(0, (64, 64))])
    base = count_ops(tiny.model, inputs)
    rows = [{"family": family, "setting": "unhooked", "ops": _ops(base), "syncs": base[SYNC], "reads": base[READS]}]
    for label, method, options in SETTINGS:
        with vtprune.apply(tiny.model, method, **options):
            c = count_ops(tiny.model, inputs)
        extra = (c - base) + collections.Counter()
        extra.pop(SYNC, None)
        extra.pop(READS, None)
        rows.append({"family": family, "setting": label, "ops": _ops(c), "syncs": c[SYNC], "reads": c[READS],
                     "extra_top": dict(extra.most_common(6))})
    return rows


def _ops(counts: collections.Counter) -> int:
    """Top-level aten ops of a :func:`count_ops` result (its sync tallies left out)."""
    return sum(counts.values()) - counts[SYNC] - counts[READS]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Print a Markdown table of op and sync counts; optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="llava_next,qwen2_vl")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = [r for fam in args.families.split(",") if fam for r in family_rows(fam, args.layers)]
    print(f"tiny models with {args.layers} decoder layers, torch {torch.__version__}; one cached prefill each")
    print("| family | setting | aten ops | vs unhooked | host syncs | all host reads | most added ops |")
    print("|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        base.setdefault(r["family"], r["ops"])
        added = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in r.get("extra_top", {}).items())
        print(f"| {r['family']} | {r['setting']} | {r['ops']} | {r['ops'] - base[r['family']]:+d} | {r['syncs']} "
              f"| {r['reads']} | {added} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
