"""DyCoke (CVPR 2025; docs/algorithms.md, ``dycoke``; docs/video_methods.md): temporal token merging (TTM) before
the LLM. Tokens of a frame that repeat the same spatial position of its reference frame give way."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from ..registry import register_pruner
from ..view import ImageLayout, Selection, VisualView, budget
from .base import Pruner, TemporalConfig

#: the reference code's role for a frame it leaves out entirely (the last frame of an odd frame count)
LOST = -2


def reference_frames(num_frames: int, reference: bool) -> list[int | None]:
    """Each frame's reference frame (``None``: an anchor, kept whole), in DyCoke's windows of 4 frames
    ``4w .. 4w+3``: frame 4w+1 against 4w (stage 1's pairs), 4w+2 against 4w (stage 2), 4w+3 against 4w+2
    (stage 1). ``reference``: the code's loops — stage 2 only for ``4w < F - 4`` (with 32 frames, frame 30
    escapes it) and, for an odd frame count, the last frame :data:`LOST`."""
    roles: list[int | None] = [None] * num_frames
    for i in range(0, num_frames - 1, 2):
        roles[i + 1] = i
    for i in range(0, num_frames - 4 if reference else num_frames - 2, 4):
        roles[i + 2] = i
    if reference and num_frames % 2:
        roles[-1] = LOST
    return roles


@dataclass
class DyCokeConfig(TemporalConfig):
    """Keep every anchor frame whole and, of each other frame, the tokens least similar to its reference frame.

    mode="clean": the exact budget of ``keep`` per video; the budget left after the anchors is split evenly over the
    other frames; each dropped token is averaged into the kept token it repeats (same position, nearest kept frame
    along its reference chain). mode="reference": the code's rules (``keep = 1 - K``, K the pruning rate, 0.7 in the
    lmms-eval wrapper): each pruned frame keeps ``⌊keep·n⌋`` tokens (an int keep: that many), anchors and
    newline tokens stay, dropped tokens are dropped (no averaging), the windows of :func:`reference_frames`."""

    name = "dycoke"


@register_pruner
class DyCokePruner(Pruner):
    """DyCoke's first stage, temporal token merging (TTM), pre-LLM on the projected (pooled) video tokens: in
    windows of 4 frames (a Qwen frame is a temporal group of 2 frames), a non-anchor frame keeps the tokens whose
    cosine similarity to the same (row, column) of its reference frame is lowest (:func:`reference_frames`). The
    paper calls it merging; the reference code drops, which ``mode="reference"`` follows, while ``mode="clean"``
    averages each dropped token into the token it repeats through the :class:`~vtprune.view.Selection` replacement
    states (sizes reported, so ``merge="proportional"`` adds ``log size``). Kept tokens stay in original order (the
    reference emits each frame's survivors in similarity order). DyCoke's second stage, decode-time KV pruning by
    attention, is not implemented.

    Clean budgets: with ``k`` below the anchors' tokens, each anchor frame keeps an even lattice of itself
    (:func:`vtprune.ops.spread`) and the other frames nothing. Images: one anchor frame (an image's segments never
    reference each other), so the clean mode keeps a lattice and the reference mode keeps everything. Tokens in no
    frame grid (newlines) rank last in the clean mode. See docs/algorithms.md, section ``dycoke``, and
    docs/video_methods.md."""

    config_class = DyCokeConfig
    sites = ("pre_llm",)

    def _roles(self, frames: ops.Frames) -> list[int | None]:
        """Each frame's reference frame; a frame whose grid differs from its reference's is an anchor."""
        if not frames.video:
            return [None] * len(frames.grids)
        roles = reference_frames(len(frames.grids), self.config.reference)
        return [r if r is None or r == LOST or frames.shapes[r] == frames.shapes[t] else None
                for t, r in enumerate(roles)]

    def _frame_keep(self, n: int) -> int:
        """Tokens a pruned frame of ``n`` keeps in the reference mode."""
        keep = self.config.keep
        return min(n, keep if isinstance(keep, int) else math.floor(keep * n))

    def count(self, layout: ImageLayout) -> int:
        if not self.config.reference:
            return budget(self.config.keep, layout.size)
        frames = ops.frames_of(layout)
        kept = frames.other.numel()
        for grid, role in zip(frames.grids, self._roles(frames)):
            kept += grid.numel() if role is None else 0 if role == LOST else self._frame_keep(grid.numel())
        return kept

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        frames = ops.frames_of(view.layout)
        x, device = view.features, view.features.device
        roles = self._roles(frames)
        grids = [g.flatten().to(device) for g in frames.grids]
        anchors = [g for g, r in zip(grids, roles) if r is None]
        pruned = [t for t, r in enumerate(roles) if r is not None and r != LOST]
        if self.config.reference:
            shares = [self._frame_keep(grids[t].numel()) for t in pruned]
        elif k < sum(a.numel() for a in anchors):
            return Selection(indices=ops.spread(anchors, k))
        else:
            grid_total = sum(g.numel() for g in grids)
            shares = ops.split_budget(min(k, grid_total) - sum(a.numel() for a in anchors),
                                      [grids[t].numel() for t in pruned])
        kept = torch.zeros(view.num_tokens, dtype=torch.bool, device=device)
        for a in anchors:
            kept[a] = True
        for t, share in zip(pruned, shares):
            change = ops.paired_dissimilarity(x[grids[t]], x[grids[roles[t]]])
            kept[grids[t][ops.top_k(change, share).indices]] = True
        if self.config.reference:
            kept[frames.other.to(device)] = True
            return Selection(indices=kept.nonzero().flatten())
        other = frames.other.to(device)
        kept[other[:k - int(kept.sum())]] = True
        return self._averaged(x, kept, grids, roles)

    @staticmethod
    def _averaged(x: torch.Tensor, kept: torch.Tensor, grids: list[torch.Tensor], roles: list[int | None]) -> Selection:
        """The clean mode's merge: every dropped token of a pruned frame is averaged into the kept token at its
        position in the nearest kept frame along its reference chain (frames are visited in order, so a reference
        frame's owners are known first); dropped anchor tokens are not merged."""
        owner = torch.where(kept, torch.arange(x.shape[0], device=x.device), -1)
        for t, role in enumerate(roles):
            if role is not None:
                mine = grids[t]
                owner[mine] = torch.where(kept[mine], mine, owner[grids[role]])
        indices = kept.nonzero().flatten()
        slot = torch.full_like(owner, -1)
        slot[indices] = torch.arange(indices.numel(), device=x.device)
        sources = (~kept & (owner >= 0)).nonzero().flatten()
        ones = torch.ones(indices.numel(), device=x.device)
        states, sizes = ops.size_weighted_merge(x[indices], ones, x[sources], slot[owner[sources]])
        return Selection(indices=indices, embeddings=states, sizes=sizes)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``4·V·D``: at most one cosine per token against its reference frame (a dot product and a norm, 2·D
        each); the clean mode's averaging adds ``V·D``."""
        return 5 * before * dim
