"""What the last forward/generate did: visual tokens per sample and sequence length per decoder layer.

The cost-accounting code (FLOPs, KV bytes) reads these; nothing here is estimated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SampleStats:
    """One batch row of the last prefill.

    images: (tokens before, tokens after) per image of this sample (after the last cut of a schedule).
    layer_seq_lens: real (non-padding) tokens each decoder layer processed during prefill.
    layer_visual: visual tokens each decoder layer processed during prefill (a multi-stage schedule shows its
    steps here).
    image_cuts: per image, its visual tokens before the first cut and after each cut.
    """

    images: list[tuple[int, int]]
    layer_seq_lens: list[int]
    layer_visual: list[int] = field(default_factory=list)
    #: per image: its visual tokens before the first cut and after each cut (one cut: ``[before, after]``)
    image_cuts: list[list[int]] = field(default_factory=list)

    @property
    def visual_before(self) -> int:
        return sum(b for b, _ in self.images)

    @property
    def visual_after(self) -> int:
        return sum(a for _, a in self.images)


@dataclass
class PruneStats:
    """Per-sample stats of the last prefill, plus batch-level facts.

    padded_layer_seq_lens: the padded sequence length each decoder layer saw (what the kernels ran on).
    decode_steps: forward calls after that prefill that extended its KV cache.
    """

    site: str
    layer: int | None
    samples: list[SampleStats] = field(default_factory=list)
    padded_layer_seq_lens: list[int] = field(default_factory=list)
    decode_steps: int = 0
    prefill_calls: int = 0

    @property
    def visual_before(self) -> list[int]:
        return [s.visual_before for s in self.samples]

    @property
    def visual_after(self) -> list[int]:
        return [s.visual_after for s in self.samples]

    def as_dict(self) -> dict:
        """JSON-friendly summary."""
        return {
            "site": self.site, "layer": self.layer, "prefill_calls": self.prefill_calls,
            "decode_steps": self.decode_steps, "padded_layer_seq_lens": self.padded_layer_seq_lens,
            "samples": [{"images": s.images, "visual_before": s.visual_before, "visual_after": s.visual_after,
                         "layer_seq_lens": s.layer_seq_lens, "layer_visual": s.layer_visual} for s in self.samples],
        }


class StatsRecorder:
    """Collects per-layer lengths during one prefill with as few host syncs as possible."""

    def __init__(self, site: str, layer: int | None) -> None:
        self.stats = PruneStats(site=site, layer=layer)
        self._layers: list[tuple[int, torch.Tensor, int]] = []
        self._images: list[list[list[int]]] = []  # per row, per image: visual tokens before and after each cut
        self._order: list[list[int]] = []  # per image of the call (batch order): its counts
        self.real: torch.Tensor | None = None  # real tokens per row at the current point of the forward
        self.stage = 0  # selections made so far in this prefill (a layer's visual count is its images' [stage])

    def begin_prefill(self, real_per_row: torch.Tensor) -> None:
        calls = self.stats.prefill_calls + 1
        self.stats = PruneStats(site=self.stats.site, layer=self.stats.layer, prefill_calls=calls)
        self._layers, self.real, self.stage, self._order = [], real_per_row, 0, []
        self._images = [[] for _ in range(real_per_row.shape[0])]

    def add_image(self, row: int, before: int, after: int) -> None:
        counts = [before, after]
        self._images[row].append(counts)
        self._order.append(counts)

    def restage(self, image: int, after: int) -> None:
        """A later cut of a schedule left ``after`` tokens of the call's ``image``-th image (batch order)."""
        self._order[image].append(after)

    def layer(self, padded_len: int) -> None:
        self._layers.append((padded_len, self.real, self.stage))

    def decode_step(self) -> None:
        self.stats.decode_steps += 1

    def finalize(self) -> PruneStats:
        """Materialise pending per-layer counts into :attr:`stats` and return it."""
        if self._layers:
            per_layer = torch.stack([r for _, r, _ in self._layers], 1).tolist()
            self.stats.padded_layer_seq_lens = [p for p, _, _ in self._layers]
            self.stats.samples = [
                SampleStats(images=[(c[0], c[-1]) for c in imgs], layer_seq_lens=lens, image_cuts=[list(c) for c in imgs],
                            layer_visual=[sum(c[min(stage, len(c) - 1)] for c in imgs) for _, _, stage in self._layers])
                for imgs, lens in zip(self._images, per_layer)]
            self._layers = []
        return self.stats
