"""Selection overhead of every registered pruner: time in ``pruner.select`` ÷ unpruned LLM prefill time.

Random-weight LLaVA-style models from ``configs/models/bench-small.json`` (LLaMA decoder, hidden 1024, 8 layers;
its CLIP tower deepened from 1 to 2 layers so that every method has an encoder layer to read): LLaVA-1.5 with
576 visual tokens, and the same config as LLaVA-NeXT with one 672×672 image = 5 views of 576 = 2880 grid tokens
(+ 48 row-newline tokens: 2928 visual tokens in all).

Per model: the unpruned prefill (``model(**inputs, use_cache=True, logits_to_keep=1)``) is timed, and within
it the language model's forward alone (the LLM prefill, the denominator). Per method (its default site and
options): one pruned prefill records the ``VisualView`` handed to ``select``; then ``select(view, k)`` is
timed directly for each keep ratio. The recorded first call includes one-time work (e.g. the low-rank factors
of ``zoo rank=128``); it is kept apart, in the JSON only. CPU, ``perf_counter``, medians of ``--repeats``.

    python bench/selection_overhead.py --repeats 3 --json results/selection_overhead.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vtprune
from vtprune.benchmark import resolve_model, synthetic_inputs
from vtprune.errors import VTPruneError
from vtprune.measure import environment, median
from vtprune.models import adapter_for, family_class
from vtprune.registry import make_config
from vtprune.view import VisualView, budget

KEEPS = (0.25, 0.11)
#: extra rows beyond each method's defaults: (label, pruner, options)
VARIANTS = (("zoo rank=128", "zoo", {"rank": 128}),)
#: LLaVA-NeXT AnyRes settings added to the bench-small config for the 2880-token model
ANYRES = {"image_grid_pinpoints": [[336, 672], [672, 336], [672, 672]], "image_seq_length": 576}


def build(kind: str, spec: str, seed: int = 0) -> nn.Module:
    """A random-weight float32 SDPA model of ``kind`` (llava | llava_next) from the config file ``spec``."""
    import transformers

    data = json.loads(resolve_model(spec).read_text())
    data.pop("model_type")
    data.pop("architectures", None)
    if kind == "llava_next":
        data.update(ANYRES)
    vision = data["vision_config"]
    vision["num_hidden_layers"] = max(vision["num_hidden_layers"], 2)  # VTC-CLS sums layers before the last
    config = transformers.AutoConfig.for_model(kind, **data)
    torch.manual_seed(seed)
    cls = family_class(kind).model_class()
    return cls._from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def seconds(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Wall time of one call (CPU kernels are synchronous)."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def prefill_times(model: nn.Module, inputs: dict, repeats: int) -> tuple[float, float]:
    """Medians of (whole unpruned prefill, its language-model forward), one warm-up first."""
    lm = adapter_for(model).language_model
    marks: list[float] = []
    hooks = [lm.register_forward_pre_hook(lambda *a: marks.append(time.perf_counter())),
             lm.register_forward_hook(lambda *a: marks.append(time.perf_counter()))]
    whole, llm = [], []
    try:
        with torch.inference_mode():
            for i in range(repeats + 1):
                marks.clear()
                t = seconds(model, **inputs, use_cache=True, logits_to_keep=1)
                if i:
                    whole.append(t)
                    llm.append(marks[1] - marks[0])
    finally:
        for h in hooks:
            h.remove()
    return median(whole), median(llm)


def recorded_view(model: nn.Module, inputs: dict, name: str, options: dict) -> tuple[Any, VisualView, float]:
    """(a fresh pruner of this setting, the view its select received in one pruned prefill, that first
    call's seconds)."""
    calls: list[tuple[VisualView, float]] = []
    with vtprune.apply(model, name, keep=KEEPS[0], **options) as handle:
        pruner = handle.pruner
        original = pruner.select

        def select(view, k):
            start = time.perf_counter()
            out = original(view, k)
            calls.append((view, time.perf_counter() - start))
            return out
        pruner.select = select
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
        del pruner.select
    view, first = calls[0]
    return pruner, view, first


def measure(model: nn.Module, inputs: dict, repeats: int, settings: list[tuple[str, str, dict]],
            llm_scale: float = 1.0) -> dict:
    """Selection medians per setting and keep, with the unpruned prefill times. ``llm_scale`` multiplies the
    measured LLM prefill: for a model built with fewer decoder layers than the one it stands for, real layers ÷
    built layers (``llm_prefill_s`` is then the scaled time, ``llm_measured_s`` the measured one)."""
    whole, measured = prefill_times(model, inputs, repeats)
    llm = measured * llm_scale
    rows = []
    for label, name, options in settings:
        try:
            pruner, view, first = recorded_view(model, inputs, name, options)
        except VTPruneError as e:  # a method this model cannot run: say so in the table
            print(f"  {label:16s} skipped: {e}", flush=True)
            rows.append({"label": label, "error": str(e)})
            continue
        row = {"label": label, "site": pruner.config.site, "visual": view.num_tokens, "first_s": first}
        with torch.inference_mode():
            for keep in KEEPS:
                k = budget(keep, view.num_tokens)
                row[keep] = median([seconds(pruner.select, view, k) for _ in range(repeats)])
        rows.append(row)
        print(f"  {label:16s} " + "  ".join(f"keep={keep}: {100 * row[keep] / llm:.3f} %" for keep in KEEPS),
              flush=True)
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    return {"prefill_s": whole, "llm_prefill_s": llm, "llm_measured_s": measured, "llm_scale": llm_scale,
            "visual": visual, "tokens": inputs["input_ids"].shape[1], "rows": rows}


def settings_for(methods: str | None) -> list[tuple[str, str, dict]]:
    """(label, pruner, options) of each method in the comma-separated ``methods`` (default: every registered one)
    at its defaults, plus the :data:`VARIANTS` of those methods; each checked now, before any model is built."""
    names = methods.split(",") if methods else vtprune.list_pruners()
    settings = [(n, n, {}) for n in names] + [v for v in VARIANTS if v[1] in names]
    for _, name, options in settings:
        make_config(name, keep=KEEPS[0], **options)  # fail fast on a bad setting
    return settings


def markdown(results: dict[str, dict]) -> str:
    """One table: a row per setting, a column pair per (model, keep)."""
    models = list(results)
    head = "| method | site | " + " | ".join(f"{m} keep={keep}" for m in models for keep in KEEPS) + " |"
    lines = [head, "|---|---|" + "---|" * (len(models) * len(KEEPS))]
    by_label = {m: {r["label"]: r for r in results[m]["rows"]} for m in models}
    for label in by_label[models[0]]:
        cells, site = [], "-"
        for m in models:
            r, llm = by_label[m][label], results[m]["llm_prefill_s"]
            site = r.get("site", site)
            cells += [f"{1e3 * r[keep]:.1f} ms = **{100 * r[keep] / llm:.2f} %**" if keep in r else "n/a"
                      for keep in KEEPS]
        lines.append(f"| {label} | {site} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse options, run both sizes, print the Markdown table (and write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-small", help="a LLaVA config (name in configs/models or path)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: every registered one)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = settings_for(args.methods)
    results, env = {}, None
    for kind, size in (("llava", None), ("llava_next", (672, 672))):
        model = build(kind, args.model)
        env = env or environment(model)
        inputs = synthetic_inputs(model.config, image_size=size)
        label = f"{kind} {int((inputs['input_ids'] == model.config.image_token_id).sum())} tok"
        print(f"{label}: timing the unpruned prefill", flush=True)
        results[label] = measure(model, inputs, args.repeats, settings)
        r = results[label]
        print(f"  prefill {r['prefill_s']:.2f} s, LLM prefill {r['llm_prefill_s']:.2f} s", flush=True)
        del model
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "args": vars(args) | {"json": str(args.json)},
                                         "keeps": KEEPS, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
