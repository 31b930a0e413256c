"""Pruned variants of lmms-eval 0.7.x's own wrappers — the ones each model family names in its ``lmms``
(:class:`vtprune.models.LmmsWrapper`), e.g. LLaVA-HF and Qwen2/2.5-VL — registered by :mod:`vtprune.lmms_plugin`.

Each subclass takes vtprune's ``model_args`` — ``pruner`` (a registered name, or ``none`` for the unpruned model)
plus that pruner's options (``keep``, ``site``, ``layer``, ``positions``, ``seed``, pruner-specific ones) — pops them
before the wrapped ``__init__`` (which asserts that no unknown argument is left), installs the pruner on the loaded
model, and measures every ``generate`` with :class:`vtprune.harness.probe.PruneProbe`. After each
``generate_until`` it logs the per-run averages through lmms-eval's ``log_metrics``, so they appear in the results
JSON as ``throughput.avg_vtprune_<name>``: visual tokens before/after, kept ratio, FLOPs per question (FastV
convention and exact prefill), prefill (time to first token) and end-to-end ms per batch, selection overhead.

    lmms-eval --model vtprune_llava_hf --model_args pretrained=PATH,pruner=uniform,keep=64 --tasks T

``keep=1`` parses as the int 1 (one token per image); write ``keep=1.0`` for "all tokens".
"""

from __future__ import annotations

import importlib
import resource
from typing import Any

import torch
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from . import api
from .harness.probe import PruneProbe
from .models import lmms_wrappers
from .registry import make_config, pruner_class

NO_PRUNER = ("none", "unpruned", "")
METRIC_PREFIX = "vtprune_"


def split_pruning_args(pruner: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the pruner's options from ``kwargs`` (in place) and return them, validated (fails before the model
    loads). ``pruner`` none/unpruned means no pruning and no options."""
    if pruner is None or str(pruner).lower() in NO_PRUNER:
        return {}
    fields = pruner_class(pruner).config_class.field_names()
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    make_config(pruner, **options)
    return options


def _process_peak_bytes() -> int:
    """Peak memory of this process: CUDA allocations on GPU, else the peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PruningMixin:
    """Pops the pruning arguments, installs the pruner and the probe after the wrapped class loaded the model, and
    reports the measurements after every ``generate_until``."""

    def __init__(self, pruner: str = "none", **kwargs: Any) -> None:
        options = split_pruning_args(pruner, kwargs)
        super().__init__(**kwargs)
        active = pruner is not None and str(pruner).lower() not in NO_PRUNER
        self.vtprune_handle = api.apply(self.model, pruner, **options) if active else None
        self.vtprune_probe = PruneProbe(self.model, self.vtprune_handle).__enter__()

    def generate_until(self, requests: list[Any]) -> list[Any]:
        try:
            return super().generate_until(requests)
        finally:
            self.report_pruning()

    def report_pruning(self) -> None:
        """Log what the probe measured since the last report (numbers only) and start afresh."""
        if not self.vtprune_probe.measurements:
            return
        summary = self.vtprune_probe.summary()
        metrics = {METRIC_PREFIX + k: v for k, v in summary.items() if isinstance(v, (int, float))}
        metrics[METRIC_PREFIX + "process_peak_bytes"] = _process_peak_bytes()
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=metrics)
        self.vtprune_probe.measurements.clear()


def _pruned(base_path: str, name: str, is_simple: bool) -> type:
    """``name``: :class:`PruningMixin` over the lmms-eval class at ``base_path`` (``module.Class``)."""
    module, cls = base_path.rsplit(".", 1)
    base = getattr(importlib.import_module(module), cls)
    doc = f"lmms-eval's {'simple' if is_simple else 'chat'} ``{module}.{cls}`` with vtprune pruning."
    return type(name, (PruningMixin, base), {"is_simple": is_simple, "__module__": __name__, "__doc__": doc})


for _wrapper in lmms_wrappers():
    for _simple, _path in _wrapper.bases():
        _name = _wrapper.pruned_class_name(_simple)
        globals()[_name] = _pruned(_path, _name, _simple)
