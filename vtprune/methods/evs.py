"""EVS, vLLM's Efficient Video Sampling (arXiv 2510.14624; docs/algorithms.md, ``evs``; docs/video_methods.md):
drop the video tokens that barely changed since the same spatial position of the previous frame."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..registry import register_pruner
from ..view import ImageLayout, Selection, VisualView
from .base import Pruner, TemporalConfig


@dataclass
class EVSConfig(TemporalConfig):
    """Keep the tokens that changed most since the previous frame (the first frame whole).

    mode="clean": the exact budget of ``keep``; below the first frame's size an even lattice of it.
    mode="reference": vLLM's count ``max(tokens per frame, ⌊V·keep⌋)`` (``keep = 1 - q``, q = vLLM's
    ``--video-pruning-rate``; an int keep is the count, at least one frame), ``1 - cos`` in the features' dtype."""

    name = "evs"


@register_pruner
class EVSPruner(Pruner):
    """Score every token of frame t >= 1 by ``1 - cos`` to the token at the same (row, column) of frame t-1
    (a Qwen frame is a temporal group of 2 frames); the first frame, and any frame whose grid differs from its
    predecessor's, scores above every change (vLLM: 255); keep the k highest scores over the whole video (one global
    stable ranking, ties to the lower index). Tokens in no frame grid (newlines) rank last. No merging, no attention.

    Images: one frame with no predecessor, which vLLM never prunes (``mode="reference"`` keeps it whole); the clean
    mode keeps an even lattice of it (:func:`vtprune.ops.spread`), the same fallback as a video whose budget is
    below its first frame. See docs/algorithms.md, section ``evs``, and docs/video_methods.md."""

    config_class = EVSConfig
    sites = ("pre_llm",)

    def count(self, layout: ImageLayout) -> int:
        if not self.config.reference:
            return super().count(layout)
        frames = ops.frames_of(layout)
        if not frames.video:
            return layout.size
        grid = sum(g.numel() for g in frames.grids)
        first = frames.grids[0].numel()
        keep = self.config.keep
        wanted = int(keep) if isinstance(keep, int) else math.floor(grid * keep)
        return min(layout.size, max(first, wanted))

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        frames = ops.frames_of(view.layout)
        x = view.features
        score = torch.full((view.num_tokens,), float("-inf"), device=x.device)
        forced = []
        for t, grid in enumerate(frames.grids):
            idx, prev = grid.flatten().to(x.device), frames.previous(t)
            if prev is None:
                score[idx] = float("inf")
                forced.append(idx)
            elif self.config.reference:
                score[idx] = 1 - F.cosine_similarity(x[idx], x[prev.flatten().to(x.device)], dim=-1).float()
            else:
                score[idx] = ops.paired_dissimilarity(x[idx], x[prev.flatten().to(x.device)])
        if k < sum(f.numel() for f in forced):
            return Selection(indices=ops.spread(forced, k))
        return ops.top_k(score, k)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``4·V·D``: one cosine per token against its predecessor (a dot product and a norm, 2·D each)."""
        return 4 * before * dim
