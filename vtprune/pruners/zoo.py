"""ZOO-Prune (arXiv 2509.24837, spec ``algorithms.md`` §1): zeroth-order projector sensitivity
(:mod:`vtprune.sensitivity`) + Sensitivity-Aware Diverse Selection (:func:`vtprune.diversity.sads`)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .. import diversity
from ..capture import PROJECTOR
from ..config import PrunerConfig
from ..registry import register_pruner
from ..sensitivity import ZOOptions, ZOScorer
from ..view import ImageLayout, Selection, VisualView
from .base import Pruner
from .divprune import ModeOption


@dataclass
class ZooConfig(PrunerConfig, ZOOptions, ModeOption):
    """ZOO-Prune. Sensitivity options: ``directions`` (m = 64), ``step`` (h = 0.01), ``rank`` (None = full-rank
    projector; e.g. 128, much cheaper). Directions come from the pruner's seeded generator, one bank per image
    shared by all its tokens. On LLaVA's MLP projector the clean mode computes the same central differences
    with the structured estimator of :func:`vtprune.sensitivity.mlp_sensitivity` (identical at full rank;
    ``rank`` truncates the last layer's SVD); the reference mode runs the projector as a black box, with
    ``rank`` truncating every layer as the reference's low-rank LLaVA-NeXT projector does.

    mode="clean" (default): SADS over all of an image's tokens with the exact budget; cosine in float32;
    LLaVA-NeXT newline tokens (no projector input) get the image's smallest sensitivity (see
    :mod:`vtprune.sensitivity`), so SADS takes them last.
    mode="reference": the reference code's rules — directions drawn and cosine computed in the model's dtype;
    count ``⌊ρ·V⌋`` (LLaVA-1.5; also used for Qwen, which has no reference code); on LLaVA-NeXT, per-view
    budgets ``⌊⌊5g²·ρ⌋ / views⌋`` (5g² = the hard-coded 2880 for g = 24), SADS within each view (per-view
    normalisation), plus the tokens at the *un-offset* newline indices ``r·(cols+1) + cols`` (§1.6 item 6).
    The reference's kept count then drops by the overlaps between those tokens and the SADS picks, which
    the engine's exact-count contract cannot express: overlaps are refilled with the most sensitive unkept
    tokens (the one deviation)."""

    name = "zoo"

    def validate(self) -> None:
        super().validate()
        self.validate_zo()
        self.validate_mode()


def floored_count(keep: float | int, num_tokens: int) -> int:
    """The ZOO-Prune LLaVA-1.5 count rule: ``⌊ρ·V⌋`` (at least 1); an int keep is a token count capped by V."""
    if isinstance(keep, float):
        return max(1, min(num_tokens, math.floor(keep * num_tokens)))
    return min(int(keep), num_tokens)


@functools.lru_cache(maxsize=64)
def anyres_views(layout: ImageLayout) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a LLaVA-NeXT layout (base g×g grid + newline-terminated crop grid): (view label of every token,
    base = 0, crops 1.. in raster order, newline tokens -1; the reference's un-offset newline indices).
    ``None`` for other layouts. Crops are those of the smallest grid holding the unpadded crop grid, as the
    adapter assumes (unpadding trims symmetric margins of less than one crop)."""
    segs = layout.segments
    if len(segs) != 2 or segs[0].newline or segs[0].rows != segs[0].cols or not segs[1].newline:
        return None
    g, rows, cols = segs[0].rows, segs[1].rows, segs[1].cols
    labels = torch.full((layout.size,), -1, dtype=torch.long)
    labels[:g * g] = 0
    if cols > 0:
        nph, npw = math.ceil(rows / g), math.ceil(cols / g)
        r = (torch.arange(rows)[:, None] + (nph * g - rows) // 2) // g
        c = (torch.arange(cols)[None, :] + (npw * g - cols) // 2) // g
        grid = torch.full((rows, cols + 1), -1, dtype=torch.long)
        grid[:, :cols] = 1 + r * npw + c
        labels[g * g:] = grid.flatten()
    quirk = torch.arange(rows) * (cols + 1) + cols
    return labels, quirk


@register_pruner
class ZooPruner(Pruner):
    """Score = ZO sensitivity of the projector, select = SADS on the projected features. Pre-LLM only
    (the method is defined at the projector)."""

    config_class = ZooConfig
    sites = ("pre_llm",)
    needs = frozenset({PROJECTOR})

    def __init__(self, config: ZooConfig) -> None:
        super().__init__(config)
        self.scorer = ZOScorer(config, reference=config.reference)

    def count(self, layout: ImageLayout) -> int:
        if not self.config.reference:
            return super().count(layout)
        views = anyres_views(layout)
        if views is None:
            return floored_count(self.config.keep, layout.size)
        labels, quirk = views
        return self._per_view_budget(layout, labels) * int(labels.max() + 1) + quirk.numel()

    def _per_view_budget(self, layout: ImageLayout, labels: torch.Tensor) -> int:
        """``⌊K / views⌋`` with ``K = ⌊5g²·ρ⌋`` (the reference's hard-coded 2880) or the int keep."""
        keep, nominal = self.config.keep, 5 * layout.segments[0].size
        total = math.floor(nominal * keep) if isinstance(keep, float) else keep
        return total // int(labels.max() + 1)

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        sens = self.scorer(view.extras, self.generator(view))
        dtype = view.features.dtype if self.config.reference else torch.float32
        unit = diversity.unit_rows(view.features, dtype)
        views = anyres_views(view.layout) if self.config.reference else None
        if views is None:
            picks = diversity.sads(diversity.on_demand(unit), sens, k)
        else:
            picks = self._reference_per_view(view.layout, unit, sens, k, *views)
        return Selection(indices=torch.sort(picks).values)

    def _reference_per_view(self, layout: ImageLayout, unit: torch.Tensor, sens: torch.Tensor, k: int,
                            labels: torch.Tensor, quirk: torch.Tensor) -> torch.Tensor:
        """LLaVA-NeXT reference: SADS within each view, union the un-offset newline indices, then refill
        overlaps with the most sensitive unkept tokens so that exactly k remain."""
        labels, quirk = labels.to(unit.device), quirk.to(unit.device)
        per_view = self._per_view_budget(layout, labels)
        parts = [quirk]
        for v in range(int(labels.max()) + 1):
            idx = (labels == v).nonzero().flatten()
            kv = min(per_view, idx.numel())
            if kv:
                parts.append(idx[diversity.sads(diversity.on_demand(unit[idx]), sens[idx], kv)])
        kept = torch.unique(torch.cat(parts))
        if kept.numel() < k:  # newline tokens only after every grid token, kept tokens never
            rest = sens.masked_fill(labels < 0, float(sens.min()) - 1).index_fill(0, kept, float("-inf"))
            kept = torch.cat([kept, torch.sort(rest, descending=True, stable=True).indices[:k - kept.numel()]])
        return kept
