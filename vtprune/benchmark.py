"""Prefill benchmark: the unpruned model and every pruning setting, interleaved, with FLOPs next to time.

Models come from a saved directory (``from_pretrained``, local files only) or, with random weights, from a
config file (``configs/models/*.json`` or any ``config.json``). Inputs are synthesized from the config: a prompt
of random text ids with the right number of image placeholder tokens, and random ``pixel_values`` (each family's
``synthetic_image`` in :mod:`vtprune.models`) — no processor or tokenizer is needed, and timings do not depend
on image content.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api
from .config import PrunerConfig
from .errors import VTPruneError
from .flops import FlopsReport, flops_from_stats, flops_unpruned
from .measure import (
    GenerateSample,
    PrefillSample,
    Timer,
    environment,
    measure_generate,
    measure_prefill,
    median,
    selection_seconds,
    timed_selection,
)
from .models import FAMILIES, family_class
from .registry import make_config, pruner_class

#: where ``--model NAME`` looks for ``NAME.json``
CONFIG_DIRS = (Path(__file__).resolve().parent.parent / "configs" / "models", Path("configs") / "models")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_BEFORE_IMAGE = 35  # the LLaVA-1.5 vicuna_v1 template puts 35 tokens before the image


# ---- models -------------------------------------------------------------------------------------------
def shipped_configs() -> list[str]:
    """Names of the model configs shipped in ``configs/models``."""
    return sorted({p.stem for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.json")})


def resolve_model(spec: str) -> Path:
    """A model directory, a config JSON file, or the name of a shipped config -> its path; clear error otherwise."""
    path = Path(spec)
    if path.is_dir() or path.is_file():
        return path
    for d in CONFIG_DIRS:
        if (d / f"{spec}.json").is_file():
            return d / f"{spec}.json"
    raise VTPruneError(f"unknown model {spec!r}: not a model directory, not a JSON config file, and not one of the "
                       f"shipped configs ({', '.join(shipped_configs()) or 'none found'})")


def load_config(path: Path) -> Any:
    """A transformers config from a JSON file or a model directory (its ``config.json``)."""
    from transformers import AutoConfig

    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VTPruneError(f"cannot read a model config from {file}: {e}") from e
    kind = data.pop("model_type", None)
    try:
        family_class(kind)  # a family's name, or the model_type of another class it serves (MoE variants)
    except VTPruneError:
        raise VTPruneError(f"{file}: model_type={kind!r} is not supported; expected one of {sorted(FAMILIES)}") from None
    return AutoConfig.for_model(kind, **data)


def build_model(spec: str, *, random_weights: bool = False, dtype: str = "float32", device: str = "cpu",
                attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    """Load a saved model (local files only) or build a random-weight one of real size from a config."""
    if dtype not in DTYPES:
        raise VTPruneError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    path = resolve_model(spec)
    config = load_config(path)
    cls = family_class(config.model_type).model_class(config)
    if random_weights:
        _check_fits(cls, config, DTYPES[dtype], device)
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls._from_config(config, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
        _quiet_generation(model)
    elif path.is_dir():
        model = cls.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype],
                                    attn_implementation=attn_implementation).to(device)
    else:
        raise VTPruneError(f"{path} is a config file and holds no weights: pass --random-weights to build a "
                           "random-weight model of that size, or give a saved model directory")
    return model.eval()


def _check_fits(cls: type, config: Any, dtype: torch.dtype, device: str) -> None:
    """Refuse, with the numbers, a random-weight model whose weights alone exceed the free memory
    (a 7B model in float32 needs ~28 GiB): better a clear error than the OOM killer."""
    import psutil

    with torch.device("meta"):
        shell = cls._from_config(config, dtype=dtype)
    need = sum(p.numel() for p in shell.parameters()) * torch.empty((), dtype=dtype).element_size()
    if str(device).startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = psutil.virtual_memory().available
    if need > 0.9 * free:
        raise VTPruneError(f"the {config.model_type} weights need {need / 2**30:.1f} GiB in {dtype} but only "
                           f"{free / 2**30:.1f} GiB is free on {device}; use --dtype bfloat16/float16 or a GPU")


def placeholder_ids(config: Any) -> list[int]:
    """Placeholder / marker token ids of a VLM config."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "pad_token_id")
    return sorted({int(getattr(config, n)) for n in names if getattr(config, n, None) is not None})


def _quiet_generation(model: nn.Module) -> None:
    """A random model must never stop early nor emit image placeholders while generating."""
    gen = model.generation_config
    gen.suppress_tokens = placeholder_ids(model.config)
    gen.eos_token_id = None


# ---- inputs -------------------------------------------------------------------------------------------
def synthetic_inputs(config: Any, *, image_size: tuple[int, int] | None = None, text_tokens: int = 65,
                     seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     video_frames: int = 0) -> dict[str, torch.Tensor]:
    """One prompt: ``min(35, text_tokens)`` random text ids, one image's placeholders, the remaining text ids;
    random pixels. ``image_size`` (H, W) matters for LLaVA-NeXT (AnyRes views; default 2×2 views) and Qwen (patch
    grid; default 672×672 = 576 visual tokens); LLaVA-1.5 always encodes one ``image_size²`` view.
    ``video_frames`` > 0: a video of that many frames (each ``image_size``; Qwen default 448×448) instead of the
    image, for the families that prune videos (docs/video.md)."""
    if text_tokens < 0:
        raise VTPruneError(f"text_tokens={text_tokens} must be >= 0")
    g = torch.Generator().manual_seed(seed)
    family = family_class(config.model_type)
    if video_frames:
        image = family.synthetic_video(config, video_frames, image_size, g)
    else:
        image = family.synthetic_image(config, image_size, g)
    specials = set(placeholder_ids(config))
    allowed = torch.tensor([i for i in range(min(config.text_config.vocab_size, 4096)) if i not in specials])
    text = allowed[torch.randint(len(allowed), (text_tokens,), generator=g)]
    before, after = text[:TEXT_BEFORE_IMAGE], text[TEXT_BEFORE_IMAGE:]
    ids = torch.cat([before, image.placeholders, after])[None]
    pixels = "pixel_values_videos" if video_frames else "pixel_values"
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), pixels: image.pixel_values.to(dtype),
              **image.inputs, **family.prompt_inputs(config, ids)}
    return {k: v.to(device) for k, v in inputs.items()}


# ---- settings and runs --------------------------------------------------------------------------------
@dataclass
class Setting:
    """One row of the benchmark: ``config=None`` is the unpruned model."""

    config: PrunerConfig | None

    @property
    def label(self) -> str:
        c = self.config
        if c is None:
            return "unpruned"
        return f"{c.name} {c.site if c.site == 'pre_llm' else f'K={c.layer}'} keep={c.keep}"


def make_settings(pruners: Sequence[str], keeps: Sequence[float | int], site: str | None = None,
                  layer: int | None = None) -> list[Setting]:
    """The unpruned baseline + every (pruner, keep) pair, validated now (before any model is built). ``site=None``
    is each pruner's own default site (``layer`` for FastV and DART), and then ``layer`` goes to the pruners acting
    at site ``layer`` only; a ``site`` given applies, with ``layer``, to every pruner."""
    if not pruners or not keeps:
        raise VTPruneError("give at least one pruner and one keep value")
    settings = [Setting(None)]
    for p in pruners:
        at = site or pruner_class(p).config_class.site
        k_layer = layer if site or at == "layer" else None
        settings += [Setting(make_config(p, keep=k, site=at, layer=k_layer)) for k in keeps]
    return settings


@dataclass
class SettingResult:
    """Everything measured for one setting."""

    setting: Setting
    flops: FlopsReport | None = None
    visual: tuple[int, int] = (0, 0)  # (before, after), summed over images
    prefill: list[PrefillSample] = field(default_factory=list)
    select_seconds: list[float] = field(default_factory=list)
    generate: list[GenerateSample] = field(default_factory=list)
    peak_bytes: int | None = None  # from the untimed memory run

    @property
    def prefill_ms(self) -> float:
        return 1e3 * median([s.seconds for s in self.prefill])

    @property
    def overhead_share(self) -> float:
        """Median selection time ÷ median prefill time."""
        return (median(self.select_seconds) or 0.0) / median([s.seconds for s in self.prefill])

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly record."""
        c = self.setting.config
        out = {
            "label": self.setting.label, "pruner": c.name if c else None, "keep": c.keep if c else None,
            "site": c.site if c else None, "layer": c.layer if c else None,
            "visual_before": self.visual[0], "visual_after": self.visual[1],
            "prefill_ms": self.prefill_ms, "prefill_ms_all": [1e3 * s.seconds for s in self.prefill],
            "select_ms": 1e3 * (median(self.select_seconds) or 0.0), "overhead_share": self.overhead_share,
            "peak_bytes": self.peak_bytes, "kv_bytes": self.prefill[-1].kv_bytes,
            "flops": self.flops.as_dict() if self.flops else None,
        }
        if self.generate:
            out["ttft_ms"] = 1e3 * median([g.ttft_seconds for g in self.generate])
            rates = [g.decode_tokens_per_second for g in self.generate if g.decode_tokens_per_second]
            out["decode_tokens_per_s"] = median(rates)
            out["e2e_ms"] = 1e3 * median([g.e2e_seconds for g in self.generate])
        return out


@dataclass
class BenchResult:
    """All settings of one run plus the environment they ran in; ``results[0]`` is the unpruned baseline."""

    results: list[SettingResult]
    env: dict[str, Any]
    args: dict[str, Any] = field(default_factory=dict)

    def speedups(self, r: SettingResult) -> tuple[float, float]:
        """(measured prefill speedup, FLOPs-bound speedup) of ``r`` over the baseline (exact prefill FLOPs)."""
        base = self.results[0]
        return base.prefill_ms / r.prefill_ms, base.flops.prefill_total / r.flops.prefill_total

    def as_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.results:
            measured, bound = self.speedups(r)
            rows.append({**r.as_dict(), "speedup": measured, "flops_speedup": bound, "speedup_ratio": measured / bound})
        return {"env": self.env, "args": self.args, "results": rows}

    def table(self) -> str:
        """A fixed-width table: one row per setting."""
        head = ("method", "site", "keep", "visual", "FastV", "exact", "prefill ms", "speedup", "FLOPs-bound",
                "ratio", "overhead", "KV MiB", "peak MiB")
        rows = [head]
        for r in self.results:
            c = r.setting.config
            measured, bound = self.speedups(r)
            site = "-" if c is None else ("pre_llm" if c.site == "pre_llm" else f"K={c.layer}")
            peak = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2 ** 20:.1f}"
            rows.append((
                c.name if c else "unpruned", site, "1.0" if c is None else f"{c.keep}", f"{r.visual[1]}/{r.visual[0]}",
                si_flops(r.flops.fastv), si_flops(r.flops.prefill_total), f"{r.prefill_ms:.1f}",
                f"{measured:.2f}x", f"{bound:.2f}x", f"{measured / bound:.3f}", f"{100 * r.overhead_share:.2f}%",
                f"{r.prefill[-1].kv_bytes / 2 ** 20:.1f}", peak,
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def si_flops(flops: float) -> str:
    """``3.33e12`` -> ``"3.33T"``: three significant digits with an SI prefix."""
    for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= scale:
            return f"{flops / scale:.3g}{unit}"
    return f"{flops:.3g}"


def _prefill(model: nn.Module, inputs: dict[str, Any], r: SettingResult, timer: Timer, memory: bool,
             new_tokens: int) -> tuple[PrefillSample, float]:
    """One prefill of one setting -> (sample, seconds spent in the pruner's selection); counts FLOPs the first time."""
    config = r.setting.config
    if config is None:
        sample = measure_prefill(model, inputs, timer, memory)
        if r.flops is None:
            r.flops = flops_unpruned(model, inputs, decode_steps=max(new_tokens - 1, 0))
            visual = [getattr(model.config, name, None) for name in ("image_token_id", "video_token_id")]
            n = sum(int((inputs["input_ids"] == i).sum()) for i in visual if i is not None)
            r.visual = (n, n)
        return sample, 0.0
    with api.apply(model, config) as handle:
        with timed_selection(handle.pruner, timer) as intervals:
            sample = measure_prefill(model, inputs, timer, memory)
        if r.flops is None:
            stats = handle.stats
            r.flops = flops_from_stats(model, stats, inputs=inputs, decode_steps=max(new_tokens - 1, 0),
                                       pruner=config.name)
            r.visual = (sum(stats.visual_before), sum(stats.visual_after))
    return sample, selection_seconds(intervals, timer)


def run_bench(model: nn.Module, inputs: dict[str, Any], settings: Sequence[Setting], *, repeats: int = 5,
              warmup: int = 1, new_tokens: int = 0, progress: bool = True, deadline: float | None = None
              ) -> BenchResult:
    """Time every setting ``warmup + repeats`` times, interleaved (one pass over all settings per repeat), so that
    machine-load drift hits every setting alike; then one untimed pass measures peak memory. With ``new_tokens``,
    every timed prefill is followed by a timed ``generate``. The first setting must be the unpruned baseline.
    ``deadline`` (a ``time.monotonic()`` value): no further pass starts once the last one's duration would end
    past it; at least one timed pass always runs (``args["passes"]`` says how many did)."""
    from tqdm.auto import tqdm

    if repeats < 1 or warmup < 0 or new_tokens < 0:
        raise VTPruneError(f"need repeats >= 1, warmup >= 0, new_tokens >= 0 (got {repeats}, {warmup}, {new_tokens})")
    if not settings or settings[0].config is not None:
        raise VTPruneError("the first setting must be the unpruned baseline (Setting(None))")
    timer = Timer(next(model.parameters()).device)
    results = [SettingResult(s) for s in settings]
    passes, last = 0, 0.0
    with tqdm(total=(warmup + repeats + 1) * len(results), desc="bench", disable=not progress, leave=False) as bar:
        for i in range(warmup + repeats):
            if deadline is not None and i > warmup and time.monotonic() + last > deadline:
                break
            started = time.monotonic()
            for r in results:
                sample, selection = _prefill(model, inputs, r, timer, False, new_tokens)
                if new_tokens:
                    with api.apply(model, r.setting.config) if r.setting.config else nullcontext():
                        gen = measure_generate(model, inputs, new_tokens, timer)
                if i >= warmup:
                    r.prefill.append(sample)
                    r.select_seconds.append(selection)
                    if new_tokens:
                        r.generate.append(gen)
                bar.update()
            passes, last = passes + (i >= warmup), time.monotonic() - started
        for r in results:
            r.peak_bytes = _prefill(model, inputs, r, timer, True, new_tokens)[0].peak_bytes
            bar.update()
    return BenchResult(results=results, env=environment(model), args={"passes": passes})


__all__ = [
    "BenchResult", "Setting", "SettingResult", "build_model", "load_config", "make_settings", "resolve_model",
    "run_bench", "shipped_configs", "synthetic_inputs",
]
