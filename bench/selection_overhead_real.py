"""Selection overhead of every registered method at real 7B proportions (issue 20, item 2), measured on a CPU.

For LLaVA-1.5-7B (576 visual tokens), LLaVA-NeXT-7B (one 672×672 image: 5 views × 576 = 2880 grid tokens + 48 row
newlines) and Qwen2.5-VL-7B (672×672 = 576 tokens, 1344×1680 = 2880 tokens), the model of
``configs/models/<name>.json`` is built with random weights at its real widths (hidden size, FFN, heads, vocabulary,
vision width, projector) but only ``--layers`` decoder layers (default 3: the in-LLM methods act at K = 2) and a
2-layer vision tower (the vision depth does not enter any selection; VTC-CLS needs a layer before the last).

* Denominator: the real-size LLM prefill = the language model's forward inside the unpruned prefill
  (``model(**inputs, use_cache=True, logits_to_keep=1)``, hook-timed, 1 warm-up, median of ``--repeats``) ÷ built
  layers × the real layer count (32 / 32 / 28): one real-size decoder layer × layer count, as
  ``bench/zoo_overhead_7b.py`` does, on the real prompt length.
* Numerator: ``bench/selection_overhead.py``'s — each method at its default site and options records the
  ``VisualView`` its ``select`` gets in one pruned prefill (real-size features, attention, projector), then
  ``select(view, k)`` is timed directly at keep 0.25 and 0.11 (median of ``--repeats``), plus ``zoo rank=128``.

float32, SDPA, ``--threads`` torch threads (default 1), ``perf_counter``. Several minutes per model on one thread
(``zoo`` and the 2880-token prefills dominate); ``--methods`` and ``--models`` split a run. ``--tiny`` runs the
same code on the tiny test models (plumbing only, seconds: ``tests/test_bench_selection_real.py``).

    OMP_NUM_THREADS=1 python bench/selection_overhead_real.py --repeats 3 --json results/selection_overhead_real.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: its sibling scripts
import selection_overhead as so

from vtprune.benchmark import build_model, resolve_model, synthetic_inputs
from vtprune.measure import environment

BUILT_LAYERS = 3  # decoder layers built: K = 2 for FastV/DART, and the layer they prune at
VISION_LAYERS = 2


@dataclass(frozen=True)
class Case:
    """One column group: a shipped config (its real proportions) and the synthetic image's (H, W)."""

    model: str
    family: str
    image: tuple[int, int] | None


CASES = (
    Case("llava-1.5-7b", "llava", None),  # 24 × 24 = 576
    Case("llava-next-7b", "llava_next", (672, 672)),  # base 576 + 2 × 2 crops of 576 (unpadded) + 48 newlines
    Case("qwen2.5-vl-7b", "qwen2_5_vl", (672, 672)),  # 48 × 48 patches merged 2 × 2 = 576
    Case("qwen2.5-vl-7b", "qwen2_5_vl", (1344, 1680)),  # 96 × 120 patches merged 2 × 2 = 2880
)
TINY_IMAGES = {"llava": None, "llava_next": (112, 56)}  # Qwen: 4 × 2 (or 8 × 4) merged patches


def reduced_config(name: str, layers: int) -> dict[str, Any]:
    """The shipped config of ``name`` with ``layers`` decoder layers and a VISION_LAYERS-deep vision tower."""
    data = json.loads(resolve_model(name).read_text())
    data["text_config"]["num_hidden_layers"] = layers
    data["text_config"].pop("layer_types", None)
    data["text_config"]["max_window_layers"] = min(data["text_config"].get("max_window_layers", layers), layers)
    vision = data["vision_config"]
    if "depth" in vision:  # Qwen-style tower: full attention in its last block
        vision["depth"] = VISION_LAYERS
        vision["fullatt_block_indexes"] = [VISION_LAYERS - 1]
    else:
        vision["num_hidden_layers"] = VISION_LAYERS
    return data


def real_layers(name: str) -> int:
    """Decoder layers of the real model."""
    return json.loads(resolve_model(name).read_text())["text_config"]["num_hidden_layers"]


def build(case: Case, layers: int, tiny: bool) -> tuple[nn.Module, dict[str, Any], int]:
    """(float32 SDPA model, its synthetic prompt, decoder layers built): real widths and ``layers`` layers, or
    the family's tiny test model."""
    if tiny:
        from vtprune.testing import tiny_vlm

        model = tiny_vlm(case.family, attn_implementation="sdpa").model
        size = TINY_IMAGES.get(case.family, (112, 56) if (case.image or (0,))[0] < 1000 else (224, 112))
    else:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{case.model}-{layers}l.json"
            path.write_text(json.dumps(reduced_config(case.model, layers)))
            model = build_model(str(path), random_weights=True, dtype="float32", attn_implementation="sdpa")
        size = case.image
    model.requires_grad_(False)
    return model, synthetic_inputs(model.config, image_size=size), model.config.text_config.num_hidden_layers


def run(cases: Sequence[Case], settings: list[tuple[str, str, dict]], repeats: int, layers: int, tiny: bool
        ) -> tuple[dict[str, dict], dict[str, Any]]:
    """Per case: the selection rows of :func:`selection_overhead.measure` against the real-size LLM prefill."""
    results: dict[str, dict] = {}
    env: dict[str, Any] = {}
    for case in cases:
        model, inputs, built = build(case, layers, tiny)
        env = env or environment(model)
        visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        label = f"{case.model} {visual} tok"
        scale = real_layers(case.model) / built
        print(f"{label}: {built} decoder layers built, prefill scaled × {scale:g}", flush=True)
        results[label] = so.measure(model, inputs, repeats, settings, llm_scale=scale) | {
            "model": case.model, "built_layers": built, "real_layers": real_layers(case.model), "tiny": tiny}
        r = results[label]
        print(f"  LLM prefill {r['llm_measured_s']:.2f} s measured -> {r['llm_prefill_s']:.2f} s at real depth",
              flush=True)
        del model
    return results, env


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, measure every case, print the Markdown table (and write JSON); returns the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=BUILT_LAYERS, help="decoder layers built (>= 3)")
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: every registered one)")
    parser.add_argument("--models", default=None, help="comma-separated subset of " +
                        ",".join(dict.fromkeys(c.model for c in CASES)))
    parser.add_argument("--tiny", action="store_true", help="tiny test models: the plumbing, in seconds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.layers < 3:
        raise SystemExit("need --repeats >= 1 and --layers >= 3 (the in-LLM methods prune at K = 2)")
    torch.set_num_threads(args.threads)
    settings = so.settings_for(args.methods)
    names = args.models.split(",") if args.models else [c.model for c in CASES]
    cases = [c for c in CASES if c.model in names]
    if not cases:
        raise SystemExit(f"--models {args.models!r}: expected names from {sorted({c.model for c in CASES})}")
    results, env = run(cases, settings, args.repeats, args.layers, args.tiny)
    print(so.markdown(results))
    record = {"env": env, "args": vars(args) | {"json": str(args.json)}, "keeps": so.KEEPS, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=str))
    return record


if __name__ == "__main__":
    main()
