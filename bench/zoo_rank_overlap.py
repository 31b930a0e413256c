"""Does ZOO-Prune's low-rank sensitivity pass (``rank=128``), its last-layer product in bf16
(``precision="bfloat16"``, what ``precision="model"`` runs on a bf16 model), or the projector run as a black box
(``--black-box``: ``2m`` projector passes per token, as before the structured estimator covered Qwen's PatchMerger)
select the same tokens as the float32 full-rank structured one? (issue 20, item 2: a faster estimator may become
the default only if its selections match.)

For each view ``zoo`` receives (its default site and options), the tokens selected with the full-rank projector
are compared with those of ``rank=r`` or ``precision=p`` (same seed, so the same ZO directions): overlap = |A ∩ B| / k.
As the noise
floor of the estimator itself, the full-rank selection is also compared with a full-rank one drawn with another
seed (other random directions): a rank whose overlap is as high as that floor changes nothing the estimator's own
randomness does not already change.

* real-size random weights: ``bench/selection_overhead_real.py``'s models (LLaVA-1.5-7B 576 tokens, LLaVA-NeXT-7B
  2928, Qwen2.5-VL-7B 576 and 2880), one synthetic prompt each; random projector weights have a flat spectrum,
  so truncating them loses more than it would on a trained projector (a pessimistic case).
* testbeds: the shipped checkpoints (``eval/testbed/checkpoints/{llava,qwen2_vl}``, width 128) on held-out
  images. There ``rank=128`` is the full rank of every truncated layer, so the overlap is 1 by construction;
  the rank with the same fraction of the width as 128 of 4096 (``--testbed-rank``, default 4) is the test that
  can fail.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/zoo_rank_overlap.py --json results/zoo_rank_overlap.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: its sibling scripts
import selection_overhead as so
import selection_overhead_real as sor

from vtprune.registry import build_pruner, make_config
from vtprune.view import VisualView, budget

KEEPS = (0.25, 0.11)
REAL_RANK = 128
OTHER_SEED = 1
ROOT = Path(__file__).resolve().parent.parent


def selected(view: VisualView, k: int, black_box: bool = False, **options: Any) -> set[int]:
    """The token indices ``zoo`` with ``options`` selects from ``view`` (``black_box``: with the projector's structure
    hidden, so that its sensitivity runs the projector itself)."""
    if black_box:
        proj = dataclasses.replace(view.extras["projector"], mlp=None)
        view = dataclasses.replace(view, extras=view.extras | {"projector": proj})
    pruner = build_pruner(make_config("zoo", keep=k, **options))
    with torch.inference_mode():
        return set(pruner.select(view, k).indices.flatten().tolist())


def overlaps(view: VisualView, variant: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per keep: overlap of the float32 full-rank default with ``variant`` (same seed) and with itself under
    another seed."""
    out = {}
    for keep in KEEPS:
        k = budget(keep, view.num_tokens)
        full = selected(view, k, precision="float32")
        out[str(keep)] = {"k": k, "rank": len(full & selected(view, k, **variant)) / k,
                          "other_seed": len(full & selected(view, k, seed=OTHER_SEED, precision="float32")) / k}
    return out


def label(variant: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in variant.items())


def real_size_views(models: Sequence[str] | None, tiny: bool) -> Iterator[tuple[str, VisualView]]:
    """(label, the view ``zoo`` receives) for each real-size case of ``selection_overhead_real``."""
    for case in sor.CASES:
        if models and case.model not in models:
            continue
        model, inputs, _ = sor.build(case, sor.BUILT_LAYERS, tiny)
        _, view, _ = so.recorded_view(model, inputs, "zoo", {})
        yield f"{case.model} {view.num_tokens} tok", view
        del model


def testbed_views(kind: str, items: int) -> Iterator[VisualView]:
    """The views ``zoo`` receives on the first ``items`` held-out questions of the ``kind`` testbed."""
    from vtprune.testbed.dataset import load_set
    from vtprune.testbed.export import HELDOUT_FILE
    from vtprune.testbed.model import IMAGE_SIZE, load_checkpoint, prompt

    model, processor = load_checkpoint(ROOT / "eval" / "testbed" / "checkpoints" / kind)
    for item, image in load_set(HELDOUT_FILE, IMAGE_SIZE[kind], limit=items):
        inputs = processor(images=[image], text=[prompt(kind, item.question.text)], return_tensors="pt")
        _, view, _ = so.recorded_view(model, dict(inputs), "zoo", {})
        yield view


def mean(rows: Sequence[dict[str, dict[str, float]]], keep: str, key: str) -> float:
    return sum(r[keep][key] for r in rows) / len(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, print a Markdown table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="subset of the real-size cases (model names)")
    parser.add_argument("--testbed-items", type=int, default=50, help="held-out questions per testbed (0: none)")
    parser.add_argument("--testbed-rank", type=int, default=4, help="rank on the 128-wide testbeds")
    parser.add_argument("--precision", default=None, help="compare precision=P (e.g. bfloat16) instead of ranks")
    parser.add_argument("--black-box", action="store_true", help="compare the black-box projector instead of ranks")
    parser.add_argument("--testbeds", default="llava,qwen2_vl", help="comma-separated testbeds (default: both)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead of real sizes (plumbing)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table: list[tuple[str, int, int, dict]] = []
    models = args.models.split(",") if args.models else None
    if args.black_box:
        real = testbed = [{"black_box": True}]
    else:
        real = [{"precision": args.precision}] if args.precision else [{"rank": REAL_RANK}]
        testbed = [{"precision": args.precision}] if args.precision else [{"rank": REAL_RANK},
                                                                          {"rank": args.testbed_rank}]
    for name, view in real_size_views(models, args.tiny):
        for variant in real:
            table.append((name + " (random weights)", label(variant), 1, overlaps(view, variant)))
            print(table[-1], flush=True)
    for kind in args.testbeds.split(",") if args.testbed_items else ():
        for variant in testbed:
            rows = [overlaps(v, variant) for v in testbed_views(kind, args.testbed_items)]
            table.append((f"testbed {kind}", label(variant), len(rows),
                          {keep: {key: mean(rows, keep, key) for key in ("rank", "other_seed")} | {"k": rows[0][keep]["k"]}
                           for keep in map(str, KEEPS)}))
            print(table[-1], flush=True)
    lines = ["| views | variant | n | " + " | ".join(f"keep {k}: variant vs default | keep {k}: seed vs seed"
                                                  for k in KEEPS)
             + " |", "|" + "---|" * (3 + 2 * len(KEEPS))]
    for name, variant, n, res in table:
        cells = " | ".join(f"{res[str(k)]['rank']:.3f} | {res[str(k)]['other_seed']:.3f}" for k in KEEPS)
        lines.append(f"| {name} | {variant} | {n} | {cells} |")
    print("\n".join(lines))
    record = {"args": vars(args) | {"json": str(args.json)}, "rows": [
        {"views": name, "variant": variant, "n": n, "overlap": res} for name, variant, n, res in table]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
