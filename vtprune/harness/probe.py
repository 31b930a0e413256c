"""Measure every ``model.generate`` call: time to the end of prefill, end to end, pruner selection time, visual
tokens before/after and prefill FLOPs in both conventions.

Used by the local backend and by the lmms-eval wrappers, which call ``self.model.generate`` themselves: the probe
shadows ``generate`` on the model *instance* for as long as it is active (the class is untouched) and times the
first forward of each call with a forward hook. In ``transformers`` 5 ``generate`` encodes the images before its
first forward, so "prefill" here is ``generate`` start -> end of the first forward: vision encoding, the pruner's
selection and the first logits, i.e. the time to first token.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..api import PruneHandle
from ..errors import VTPruneError
from ..flops import FlopsReport, flops_from_stats, flops_unpruned
from ..measure import Mark, Timer, selection_seconds, timed_selection


@dataclass
class GenerateMeasurement:
    """One ``generate`` call (one batch): seconds, per-sample visual tokens, prefill FLOPs summed over the batch.

    FLOPs are ``None`` when they could not be counted (e.g. a model type without a vision formula)."""

    batch: int
    prefill_s: float
    e2e_s: float
    select_s: float
    visual_before: list[int]
    visual_after: list[int]
    fastv_flops: int | None
    prefill_flops: int | None
    overhead_flops: int | None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _mean_per_sample(values: list[int | None], samples: int) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / samples


def summarize(measurements: list[GenerateMeasurement]) -> dict[str, Any]:
    """Aggregate over batches: medians of per-batch times (ms), per-sample means of visual tokens and FLOPs (FastV
    convention; exact prefill including the pruner's overhead; the overhead alone, ``None`` if unknown)."""
    n = sum(m.batch for m in measurements)
    before = sum(sum(m.visual_before) for m in measurements)
    after = sum(sum(m.visual_after) for m in measurements)
    prefill = sum(m.prefill_s for m in measurements)
    overheads = [m.overhead_flops for m in measurements]
    return {
        "samples": n, "batches": len(measurements),
        "visual_before": before / n if n else None, "visual_after": after / n if n else None,
        "kept_ratio": after / before if before else None,
        "fastv_flops": _mean_per_sample([m.fastv_flops for m in measurements], n),
        "prefill_flops": _mean_per_sample([m.prefill_flops for m in measurements], n),
        "overhead_flops": _mean_per_sample(overheads, n),
        "prefill_ms": _ms(_median([m.prefill_s for m in measurements])),
        "e2e_ms": _ms(_median([m.e2e_s for m in measurements])),
        "overhead_ms": _ms(_median([m.select_s for m in measurements])),
        "overhead_share": sum(m.select_s for m in measurements) / prefill if prefill else None,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


class PruneProbe:
    """Context manager: while active, every ``model.generate`` call appends a :class:`GenerateMeasurement` to
    :attr:`measurements`. ``handle`` is the active pruning (``None`` = unpruned model)."""

    def __init__(self, model: nn.Module, handle: PruneHandle | None, timer: Timer | None = None) -> None:
        self.model = model
        self.handle = handle
        self.timer = timer or Timer(next(model.parameters()).device)
        self.measurements: list[GenerateMeasurement] = []
        self._stack = ExitStack()
        self._intervals: list[tuple[Mark, Mark]] = []
        self._first_end: Mark | None = None
        self._in_generate = False

    def __enter__(self) -> PruneProbe:
        original: Callable[..., Any] = self.model.generate
        self.model.generate = self._wrap(original)
        self._stack.callback(delattr, self.model, "generate")
        self._stack.callback(self.model.register_forward_hook(self._forward_done).remove)
        if self.handle is not None:
            self._intervals = self._stack.enter_context(timed_selection(self.handle.pruner, self.timer))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _forward_done(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._in_generate and self._first_end is None:
            self._first_end = self.timer.mark()

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def generate(*args: Any, **kwargs: Any) -> Any:
            selections = len(self._intervals)
            self._first_end, self._in_generate = None, True
            start = self.timer.mark()
            try:
                out = original(*args, **kwargs)
            finally:
                self._in_generate = False
            end = self.timer.mark()
            self.measurements.append(self._measure(kwargs, start, end, self._intervals[selections:]))
            return out
        return generate

    def _measure(self, inputs: dict[str, Any], start: Mark, end: Mark, intervals: list[tuple[Mark, Mark]]
                 ) -> GenerateMeasurement:
        ids = inputs["input_ids"]
        if self.handle is None:  # every image and video placeholder is a visual token of the unpruned model
            config = self.model.config
            visual = [t for t in (config.image_token_id, getattr(config, "video_token_id", None)) if t is not None]
            before = after = [int(n) for n in torch.isin(ids, torch.tensor(visual, device=ids.device)).sum(1).tolist()]
        else:
            stats = self.handle.stats
            before, after = stats.visual_before, stats.visual_after
        report = self._flops(inputs)
        return GenerateMeasurement(
            batch=int(ids.shape[0]), prefill_s=self.timer.seconds(start, self._first_end or end),
            e2e_s=self.timer.seconds(start, end), select_s=selection_seconds(intervals, self.timer),
            visual_before=before, visual_after=after,
            fastv_flops=report and report.fastv, prefill_flops=report and report.prefill_total,
            overhead_flops=report and report.overhead)

    def _flops(self, inputs: dict[str, Any]) -> FlopsReport | None:
        """Prefill FLOPs of the batch on real (unpadded) tokens, vision included; ``None`` if not countable."""
        try:
            with torch.no_grad():
                if self.handle is None:
                    return flops_unpruned(self.model, inputs)
                return flops_from_stats(self.model, self.handle.stats, inputs=inputs, decode_steps=0,
                                        pruner=self.handle.config.name)
        except VTPruneError:
            return None

    def summary(self) -> dict[str, Any]:
        """:func:`summarize` of everything measured so far."""
        return summarize(self.measurements)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(m) for m in self.measurements]
