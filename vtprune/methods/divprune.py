"""DivPrune (CVPR 2025; docs/algorithms.md, ``divprune``): greedy max-min diversity on the visual features with
distance ``1 - cos``. Also holds the ``round(ρ·V)`` reference count rule, which IDPruner (mmr) shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..config import ModeOption, PrunerConfig
from ..registry import register_pruner
from ..view import ImageLayout, Selection, VisualView
from .base import Pruner


def rounded_count(keep: float | int, num_tokens: int) -> int:
    """The DivPrune / IDPruner count rule: Python's ``round(ρ·V)`` (half to even), at least 1; an int keep is
    a token count capped by V."""
    if isinstance(keep, float):
        return max(1, min(num_tokens, round(keep * num_tokens)))
    return min(int(keep), num_tokens)


class RoundedReferenceCount:
    """Pruner mixin: in ``mode="reference"`` the count is ``round(ρ·V)`` (DivPrune's and IDPruner's rule)."""

    def count(self, layout: ImageLayout) -> int:
        if self.config.reference:
            return rounded_count(self.config.keep, layout.size)
        return super().count(layout)


@dataclass
class DivPruneConfig(PrunerConfig, ModeOption):
    """Keep the k tokens chosen greedily to maximise the minimum pairwise ``1 - cos`` distance.

    mode="clean": cosine in float32, the first pick's nearest neighbour excludes the token itself.
    mode="reference": cosine in the features' dtype (fp16 in the reference), the first pick reads the 2nd
    smallest distance of each column literally, and ``k = round(ρ·V)`` (Python rounding)."""

    name = "divprune"

    def validate(self) -> None:
        super().validate()
        self.validate_mode()


def nearest_neighbour_seed(sim: torch.Tensor, second_smallest: bool = False) -> torch.Tensor:
    """DivPrune's first pick: the token whose nearest other token is farthest (distance ``1 - cos``).
    ``second_smallest`` follows the reference literally (2nd smallest distance of each column, the smallest
    being the self-distance) instead of excluding the diagonal."""
    dist = 1 - sim
    if second_smallest:
        nearest = dist.kthvalue(2, dim=0).values
    else:
        nearest = dist.masked_fill(torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device),
                                   float("inf")).amin(0)
    return nearest.argmax()


@register_pruner
class DivPrunePruner(RoundedReferenceCount, Pruner):
    """First pick: the token whose nearest neighbour is farthest; then farthest-first from the picked set.
    Uses the full V×V cosine matrix (the first pick needs it); each greedy step then costs O(V).
    See docs/algorithms.md, section ``divprune``."""

    config_class = DivPruneConfig

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        dtype = view.features.dtype if self.config.reference else torch.float32
        unit = ops.unit_rows(view.features, dtype)
        sim = unit @ unit.T
        first = nearest_neighbour_seed(sim, second_smallest=self.config.reference)
        picks = ops.max_min(ops.from_matrix(sim), view.num_tokens, k, first, unit.device)
        return Selection(indices=torch.sort(picks).values)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``2·V²·D``: the V×V cosine matrix (the greedy steps then read its columns)."""
        return 2 * before * before * dim
