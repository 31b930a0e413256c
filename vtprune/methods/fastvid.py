"""FastVID (NeurIPS 2025; docs/algorithms.md, ``fastvid``; docs/video_methods.md): dynamic temporal segmentation
(DySeg), then per segment salient tokens by attention (ATS) and density-peak anchor tokens that absorb the rest of
the segment (DTM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from ..capture import VISION_QK
from ..config import check_int, is_number
from ..errors import VTPruneError
from ..registry import register_pruner
from ..view import ImageLayout, Selection, VisualView, budget
from .base import Pruner, TemporalConfig

#: DPC-KNN neighbours of FastVID's anchor density
NEIGHBOURS = 4
#: where ATS's attention comes from
SALIENCY = ("encoder", "features")


@dataclass
class FastVIDConfig(TemporalConfig):
    """segments (c): DySeg cuts the video at its ``c - 1`` least similar frame transitions; tau (τ): and at every
    transition below this cosine; contextual (d): fraction of each frame's budget spent on merged anchor tokens;
    anchor_every (p): every p-th frame of a segment, counted from its end, is an anchor frame; beta (β): an anchor's
    weight floor, ``anchor ← w·anchor + (1-w)·mean(assigned)`` with ``w = max(1/(n+1), β)``; saliency: ATS's
    attention, ``"encoder"`` (the vision encoder's, captured) or ``"features"`` (the same rule on the projected
    states, no capture). Defaults: the LLaVA-OV scripts' (Qwen2.5-VL's used ρ=0.27, τ=0.84). mode="reference": the LLaVA-OV code's count ``⌊ρ·n⌋`` per frame
    (an int keep: that many per frame) and its merge pool, see :class:`FastVIDPruner`."""

    name = "fastvid"
    segments: int = 8
    tau: float = 0.9
    contextual: float = 0.4
    anchor_every: int = 4
    beta: float = 0.6
    saliency: str = "encoder"

    def validate(self) -> None:
        super().validate()
        for field in ("segments", "anchor_every"):
            check_int(self, field, 1)
        if not is_number(self.tau) or not -1.0 <= self.tau <= 1.0:
            raise VTPruneError(f"tau={self.tau!r}: expected a cosine threshold in [-1, 1]")
        if not is_number(self.contextual) or not 0.0 <= self.contextual < 1.0:
            raise VTPruneError(f"contextual={self.contextual!r}: expected a fraction in [0, 1)")
        if not is_number(self.beta) or not 0.0 <= self.beta <= 1.0:
            raise VTPruneError(f"beta={self.beta!r}: expected a weight in [0, 1]")
        if self.saliency not in SALIENCY:
            raise VTPruneError(f"saliency={self.saliency!r}: expected one of {SALIENCY}")


def dynamic_segments(globals_: torch.Tensor, cuts: int, tau: float) -> list[list[int]]:
    """DySeg: frames split after transition t (frames t, t+1) for the ``cuts`` transitions of lowest cosine between
    consecutive frame features ``globals_`` [F, D] (lowest index on ties) and for every transition below ``tau``."""
    num = globals_.shape[0]
    if num < 2:
        return [list(range(num))]
    unit = ops.unit_rows(globals_)
    sims = (unit[:-1] * unit[1:]).sum(-1)
    cut = set(torch.sort(sims, stable=True).indices[:cuts].tolist()) | set((sims < tau).nonzero().flatten().tolist())
    segments, start = [], 0
    for t in sorted(cut) + [num - 1]:
        segments.append(list(range(start, t + 1)))
        start = t + 1
    return segments


def anchor_frames(length: int, every: int) -> list[int]:
    """Positions in a segment of ``length`` frames that hold its anchors: every ``every``-th from the last one."""
    return [i for i in range(length) if (length - 1 - i) % every == 0]


def merge_into_anchors(x: torch.Tensor, anchors: torch.Tensor, pool: torch.Tensor, beta: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """DTM: each ``pool`` token joins its most cosine-similar anchor (lowest index on ties); an anchor with n joiners
    becomes ``w·anchor + (1-w)·mean(joiners)``, ``w = max(1/(n+1), β)`` (an anchor in the pool joins like any token).
    Returns (states [a, D] in x's dtype, how many tokens each anchor stands for: itself and its joiners but itself
    [a])."""
    states = x[anchors].float()
    if pool.numel() == 0:
        return states.to(x.dtype), torch.ones(anchors.numel(), device=x.device)
    assign = ops.best_match(x[pool], x[anchors])[1]
    joined = torch.bincount(assign, minlength=anchors.numel()).float()
    mean = ops.cluster_means(x[pool].float(), assign, anchors.numel())
    w = (1 / (joined + 1)).clamp(min=beta)[:, None]
    others = torch.bincount(assign[pool != anchors[assign]], minlength=anchors.numel()).float()
    merged = torch.where(others[:, None] > 0, w * states + (1 - w) * mean, states)  # alone: itself, bit for bit
    return merged.to(x.dtype), 1 + others


def frame_saliency(view: VisualView, source: str) -> torch.Tensor:
    """ATS's score of every token [V]: the softmax attention each frame's mean query pays the frame's tokens.
    ``"encoder"``: on the captured vision-encoder q/k of the layer the single-layer scorers read (Qwen: the last
    full-attention block, as the Qwen2.5-VL code; [CLS] encoders: the penultimate layer, [CLS] itself left out), per
    patch and summed into each token (the code averages each 2x2 group's keys first); ``"features"``:
    ``softmax(x·mean/√D)`` on the view's states. Tokens fed by no patch (newlines) score 0."""
    if source == "features":
        frame = view.layout.frame_index().to(view.features.device)
        out = torch.zeros(view.num_tokens, device=view.features.device)
        for f in torch.unique(frame[frame >= 0]).tolist():
            idx = (frame == f).nonzero().flatten()
            x = view.features[idx].float()
            out[idx] = (x @ x.mean(0) / math.sqrt(x.shape[-1])).softmax(0)
        return out
    frame = view.layout.frame_index()

    def node_scores(g: ops.AttentionGraph) -> torch.Tensor:
        token = g.token.to(frame.device)
        group = torch.where(token >= 0, frame[token.clamp(min=0)], -1)
        return ops.mean_query_attention(g, group.to(g.query.device))
    return ops.pooled(ops.reading_graphs(view), view.num_tokens, node_scores)


@register_pruner
class FastVIDPruner(Pruner):
    """FastVID, pre-LLM (the reference prunes at decoder layer 0's input, original positions). DySeg
    (:func:`dynamic_segments`) cuts the video on frame features (the mean of each frame's tokens, the Qwen2.5-VL
    code's global feature). Each frame's budget ``f`` is split into ``f - ⌊f·d⌋`` salient tokens (ATS: the frame's
    top tokens by the attention its mean query pays them, :func:`frame_saliency`) and ``⌊f·d⌋`` context
    tokens pooled per segment and handed to its anchor frames (:func:`anchor_frames`, evenly; the code's integer
    division drops the remainder, here it goes to the earliest anchor frames so the count is the paper's). An anchor
    frame's context tokens are the density peaks (:func:`vtprune.ops.density_peak_scores`, k = 4 neighbours) of its
    non-salient tokens; the segment's other non-salient tokens merge into them (:func:`merge_into_anchors`) through
    the :class:`~vtprune.view.Selection` replacement states. Context beyond an anchor frame's non-salient tokens
    becomes extra salient tokens of the segment.

    mode="clean": exact budget of ``keep`` per video split evenly over frames; each non-salient, non-anchor token of
    a segment merges into its most similar anchor of the whole segment (once; sizes count it once). mode="reference"
    (LLaVA-OV code): ``⌊ρ·n⌋`` per frame; each anchor frame merges the whole segment's non-salient tokens, anchors
    included (a token joins one anchor of every anchor frame; sizes then count it more than once). Tokens in no frame
    grid (newlines) rank last (clean) or stay (reference). Images: each grid segment is a one-frame segment (the
    code's single-frame DTM). See docs/algorithms.md, section ``fastvid``, and docs/video_methods.md."""

    config_class = FastVIDConfig
    sites = ("pre_llm",)

    def __init__(self, config: FastVIDConfig) -> None:
        super().__init__(config)
        self.needs = frozenset({VISION_QK}) if config.saliency == "encoder" else frozenset()

    def vision_layers(self, full_attention_layers: list[int], num_layers: int) -> list[int]:
        if VISION_QK not in self.needs:
            return []
        return ops.default_vision_layers(full_attention_layers, num_layers)

    def _frame_budget(self, n: int) -> int:
        """The reference count of a frame of ``n`` tokens."""
        keep = self.config.keep
        return min(n, keep if isinstance(keep, int) else int(keep * n))

    def count(self, layout: ImageLayout) -> int:
        if not self.config.reference:
            return budget(self.config.keep, layout.size)
        frames = ops.frames_of(layout)
        return frames.other.numel() + sum(self._frame_budget(g.numel()) for g in frames.grids)

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        frames = ops.frames_of(view.layout)
        x, device = view.features, view.features.device
        grids = [g.flatten().to(device) for g in frames.grids]
        sizes = [g.numel() for g in grids]
        if self.config.reference:
            shares = [self._frame_budget(n) for n in sizes]
        else:
            shares = ops.split_budget(min(k, sum(sizes)), sizes)
        if frames.video:
            segments = dynamic_segments(torch.stack([x[g].float().mean(0) for g in grids]),
                                        self.config.segments - 1, self.config.tau)
        else:
            segments = [[t] for t in range(len(grids))]
        generator = self.generator(view)
        saliency = frame_saliency(view, self.config.saliency)
        kept, states, counts = [], [], []
        for seg in segments:
            salient, anchors = self._allocate([grids[t] for t in seg], [shares[t] for t in seg], x, saliency,
                                              generator)
            kept.append(torch.cat(salient))
            states.append(x[kept[-1]])
            counts.append(torch.ones(kept[-1].numel(), device=device))
            rest = torch.cat([g[~torch.isin(g, s)] for g, s in zip((grids[t] for t in seg), salient)])
            if self.config.reference:
                merges = [merge_into_anchors(x, a, rest, self.config.beta) for a in anchors]
            elif anchors:
                anchors = [torch.cat(anchors)]
                merges = [merge_into_anchors(x, anchors[0], rest[~torch.isin(rest, anchors[0])], self.config.beta)]
            else:
                merges = []
            for a, (merged, size) in zip(anchors, merges):
                kept.append(a)
                states.append(merged)
                counts.append(size)
        other = frames.other.to(device)
        extra = other if self.config.reference else other[:k - sum(s.numel() for s in kept)]
        kept.append(extra)
        states.append(x[extra])
        counts.append(torch.ones(extra.numel(), device=device))
        indices = torch.cat(kept)
        order = torch.argsort(indices)
        return Selection(indices=indices[order], embeddings=torch.cat(states)[order], sizes=torch.cat(counts)[order])

    def _allocate(self, grids: list[torch.Tensor], shares: list[int], x: torch.Tensor, saliency: torch.Tensor,
                  generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One segment's salient tokens per frame and anchor tokens per anchor frame (STPrune + DTM's anchors)."""
        d = self.config.contextual
        salient_n = [f - int(f * d) for f in shares]
        context = sum(f - s for f, s in zip(shares, salient_n))
        where = anchor_frames(len(grids), self.config.anchor_every)
        given = [context // len(where) + (i < context % len(where)) for i in range(len(where))]
        anchor_n = [0] * len(grids)
        for i, c in zip(where, given):
            anchor_n[i] = min(c, grids[i].numel() - salient_n[i])
        overflow = context - sum(anchor_n)
        if overflow:
            spare = [g.numel() - s - a for g, s, a in zip(grids, salient_n, anchor_n)]
            salient_n = [s + e for s, e in zip(salient_n, ops.split_budget(overflow, spare))]
        salient, anchors = [], []
        for g, s, a in zip(grids, salient_n, anchor_n):
            top = g[ops.top_k(saliency[g], s).indices]
            salient.append(top)
            if a:
                rest = g[~torch.isin(g, top)]
                peaks = ops.density_peak_scores(x[rest], NEIGHBOURS, generator)
                anchors.append(torch.sort(rest[torch.topk(peaks, a).indices]).values)
        return salient, anchors

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> None:
        """``None``: per-frame distance matrices (``n_f²·D`` per frame) and segment merges depend on the frame
        count, which the formula does not see."""
