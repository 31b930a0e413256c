"""Installs the capture hooks for the signals a pruner declared in ``Pruner.needs`` and turns what they
captured into per-image ``VisualView.extras`` (see :mod:`vtprune.capture` for the signal types)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .adapters import ImageSpans, ModelAdapter
from .capture import FINAL_NORM, HINTS, LLM_QK, NEEDS, PROJECTOR, VISION_QK, LLMQK, InputCapture
from .config import PrunerConfig
from .errors import VTPruneError
from .pruners.base import Pruner

HookFn = Callable[[nn.Module, Callable], None]


class Signals:
    """The captures of one engine: decoder layer K-1's attention inputs, vision-encoder attention inputs,
    the projector's inputs, and the vision tower's own inputs (which mark a new encoding pass)."""

    def __init__(self, adapter: ModelAdapter, pruner: Pruner, config: PrunerConfig) -> None:
        self.adapter, self.pruner, self.config = adapter, pruner, config
        self.needs = frozenset(pruner.needs)
        self.llm: InputCapture | None = None
        self.tower: InputCapture | None = None
        self.vision: dict[int, InputCapture] = {}
        self.projector: InputCapture | None = None
        self._consumed = True  # the last encoding pass was used by a prefill
        self.hints: list[Any] | None = None  # one caller-given value per batch row (``HINTS``)

    def check(self) -> None:
        """Refuse signals that do not exist or cannot be had at this site, before any hook goes in."""
        name = self.config.name
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise VTPruneError(f"pruner {name!r} needs unknown signals {sorted(unknown)}; known: {NEEDS}")
        if LLM_QK in self.needs and self.config.site != "layer":
            raise VTPruneError(f"pruner {name!r} reads decoder-layer attention, so it needs site='layer'")

    def install(self, hook_pre: HookFn) -> None:
        """Register the capture pre-hooks through the engine's ``hook_pre`` (so ``remove()`` drops them)."""
        a = self.adapter
        if LLM_QK in self.needs:
            self.llm = InputCapture()
            hook_pre(a.llm_attention(self.config.layer - 1), self.llm)
        if VISION_QK in self.needs or PROJECTOR in self.needs:
            self.tower = InputCapture(armed=True)
            hook_pre(a.vision_tower, self._encoding_pass_starts)
        if VISION_QK in self.needs:
            n = a.num_vision_layers
            for layer in sorted({l % n for l in self.pruner.vision_layers(a.vision_full_attention_layers(), n)}):
                self.vision[layer] = InputCapture(armed=True)
                hook_pre(a.vision_attention(layer), self.vision[layer])
        if PROJECTOR in self.needs:
            self.projector = InputCapture(armed=True)
            hook_pre(a.projector, self.projector)

    def _encoding_pass_starts(self, module, args, kwargs) -> None:
        """A new vision-encoder pass: forget the previous pass's inputs once a prefill has used them
        (``generate`` encodes once, before its first forward; uncached steps reuse that encoding)."""
        if self._consumed:
            for cap in (self.tower, self.projector, *self.vision.values()):
                if cap is not None:
                    cap.reset()
            self._consumed = False
        self.tower(module, args, kwargs)

    def begin_prefill(self) -> None:
        if self.llm is not None:
            self.llm.reset()
            self.llm.armed = True

    def end_prefill(self) -> None:
        if self.llm is not None:
            self.llm.armed = False

    def image_extras(self, spans: ImageSpans, batch: int) -> list[dict[str, Any]]:
        """Per image of a ``batch``-row prefill: {"vision_qk": {layer: [VisionQK per encoder view]}, "projector":
        ProjectorInput, "final_norm": module, "hint": its row's hint, "hint_image": the image's index within its
        row}, for whichever the pruner asked for. Hints must come one per row: a count that does not match the
        batch (e.g. left over from another batch) is an error, never a silent shift."""
        extras: list[dict[str, Any]] = [{} for _ in range(len(spans))]
        if HINTS in self.needs and self.hints is not None:
            if len(self.hints) != batch:
                raise VTPruneError(f"pruner {self.config.name!r}: {len(self.hints)} hint(s) set for a batch of "
                                   f"{batch} row(s); call handle.set_hints with one per row before each forward")
            nth: dict[int, int] = {}
            for ex, row in zip(extras, spans.rows):
                ex["hint"], ex["hint_image"] = self.hints[row], nth.get(row, 0)
                nth[row] = nth.get(row, 0) + 1
        if FINAL_NORM in self.needs:
            for ex in extras:
                ex["final_norm"] = self.adapter.language_model.norm
        if self.tower is None:
            return extras
        if not self.tower.calls:
            raise VTPruneError(f"pruner {self.config.name!r} needs the vision encoder's signals, but no encoder "
                               "pass was seen (were pre-computed image features passed in?)")
        self._consumed = True
        for layer, cap in self.vision.items():
            per_image = self.adapter.vision_qk(layer, cap, self.tower, spans.layouts)
            for ex, views in zip(extras, per_image):
                ex.setdefault("vision_qk", {})[layer] = views
        if self.projector is not None:
            per_image = self.adapter.projector_inputs(self.projector, self.tower, spans.layouts)
            for ex, proj in zip(extras, per_image):
                ex["projector"] = proj
        return extras

    def add_llm_extras(self, spans: ImageSpans, real: torch.Tensor) -> None:
        """Attach layer K-1's post-RoPE q/k (the sample's real tokens) to each image's extras."""
        if self.llm is None:
            return
        q, k, scaling = self.adapter.llm_qk(self.config.layer - 1, self.llm)
        rank = real.long().cumsum(1) - 1
        text = real & ~spans.image_mask(real.shape)
        for ex, row, pos in zip(spans.extras, spans.rows, spans.positions):
            idx = real[row].nonzero().flatten()
            ex["llm_qk"] = LLMQK(query=q[row][:, idx], key=k[row][:, idx], image=rank[row, pos],
                                 text=rank[row, text[row]], scaling=scaling)
