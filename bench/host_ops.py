"""Host work per prefill, the part a GPU at batch 1 waits on: top-level aten ops dispatched (≈ kernel launches) and
host syncs (``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``, ``int(t)``), plus every other read of device
values the host waits for on a GPU (``nonzero``: boolean-mask indexing, ``equal``, ``.tolist()``), unhooked vs pruned,
per method and site, and the reads inside the decoder layers' span (from decoder layer 0's start to the last layer's
end: a read there makes the host wait for the layers queued before it instead of queueing the rest), on a tiny
random-weight model with many decoder layers (the arithmetic is negligible, the op count is what the real model
would launch). Measured on the CPU: counts, not times, so they hold on any machine.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/host_ops.py --families llava_next,qwen2_vl --layers 32
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import vtprune
from vtprune.models import adapter_for
from vtprune.testing import random_image, tiny_vlm

#: (label, method, apply options): the settings of the GPU report at their default sites, multi-stage schedules
#: (PyramidDrop, DART cut twice, SparseVLM) and in-LLM merging
SETTINGS = (
    ("random pre_llm", "random", {"keep": 0.25}),
    ("divprune pre_llm", "divprune", {"keep": 0.25}),
    ("fastv K=2", "fastv", {"keep": 0.25, "site": "layer", "layer": 2}),
    ("dart K=2", "dart", {"keep": 0.25, "site": "layer", "layer": 2}),
    ("random K=2", "random", {"keep": 0.25, "site": "layer", "layer": 2}),
    ("pyramiddrop", "pyramiddrop", {"keep": 0.25}),
    ("fastv K=2 merge", "fastv", {"keep": 0.25, "site": "layer", "layer": 2, "merge": "proportional"}),
    ("dart 2 cuts", "dart", {"schedule": ((1, 0.5), (3, 0.25))}),
    ("sparsevlm", "sparsevlm", {"keep": 0.25}),
)
SYNC = "aten::_local_scalar_dense"
#: the other host reads of device values: ``nonzero`` (also inside boolean-mask indexing) and ``equal`` at any depth;
#: ``resolve_conj`` at top level is what ``Tensor.tolist()`` dispatches (a copy to the host on a GPU)
READS = "host reads"
#: the host reads made between the start of decoder layer 0 and the end of the last decoder layer
IN_LAYERS = "host reads in layers"
#: the profiler range that marks the decoder layers' span
SPAN = "vtprune::decoder_layers"


def count_ops(model: torch.nn.Module, inputs: dict[str, Any], layers: Sequence[torch.nn.Module] = ()
              ) -> collections.Counter:
    """Top-level aten ops (not nested in another aten op) of one cached prefill, after one warm-up call; with the
    model's decoder ``layers``, also the host reads inside their span (:data:`IN_LAYERS`)."""
    with torch.inference_mode():
        model(**inputs, use_cache=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof, _layer_span(layers):
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
            counts[IN_LAYERS] += _inside(e, SPAN)
        if top:
            counts[e.name] += 1
    return counts


@contextlib.contextmanager
def _layer_span(layers: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Mark the span from decoder layer 0's first pre-hook (before any other's) to the last layer's end with a
    profiler range named :data:`SPAN`."""
    if not layers:
        yield
        return
    span = record_function(SPAN)

    def enter(*_: Any) -> None:
        span.__enter__()

    def leave(*_: Any) -> None:
        span.__exit__(None, None, None)

    handles = [layers[0].register_forward_pre_hook(enter, prepend=True), layers[-1].register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _inside(event: Any, name: str) -> bool:
    """Whether a profiler ``event`` runs inside a range called ``name``."""
    parent = event.cpu_parent
    while parent is not None and parent.name != name:
        parent = parent.cpu_parent
    return parent is not None


def family_rows(family: str, layers: int) -> list[dict[str, Any]]:
    """Unhooked and every setting of :data:`SETTINGS` on ``family``'s tiny model with ``layers`` decoder layers."""
    tiny = tiny_vlm(family, num_layers=layers)
    inputs = tiny.inputs([tiny.prompt("how many")], [random_image(0, (64, 64))])
    decoder = adapter_for(tiny.model).layers
    base = count_ops(tiny.model, inputs, decoder)
    rows = [{"family": family, "setting": "unhooked", "ops": _ops(base), "syncs": base[SYNC], "reads": base[READS],
             "reads_in_layers": base[IN_LAYERS]}]
    for label, method, options in SETTINGS:
        with vtprune.apply(tiny.model, method, **options):
            c = count_ops(tiny.model, inputs, decoder)
        extra = (c - base) + collections.Counter()
        for tally in (SYNC, READS, IN_LAYERS):
            extra.pop(tally, None)
        rows.append({"family": family, "setting": label, "ops": _ops(c), "syncs": c[SYNC], "reads": c[READS],
                     "reads_in_layers": c[IN_LAYERS], "extra_top": dict(extra.most_common(6))})
    return rows


def _ops(counts: collections.Counter) -> int:
    """Top-level aten ops of a :func:`count_ops` result (its sync tallies left out)."""
    return sum(counts.values()) - counts[SYNC] - counts[READS] - counts[IN_LAYERS]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Print a Markdown table of op and sync counts; optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="llava_next,qwen2_vl")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = [r for fam in args.families.split(",") if fam for r in family_rows(fam, args.layers)]
    print(f"tiny models with {args.layers} decoder layers, torch {torch.__version__}; one cached prefill each")
    print("| family | setting | aten ops | vs unhooked | host syncs | all host reads | reads in layers "
          "| most added ops |")
    print("|---|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        base.setdefault(r["family"], r["ops"])
        added = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in r.get("extra_top", {}).items())
        print(f"| {r['family']} | {r['setting']} | {r['ops']} | {r['ops'] - base[r['family']]:+d} | {r['syncs']} "
              f"| {r['reads']} | {r['reads_in_layers']} | {added} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
