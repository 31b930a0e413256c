"""DivPrune (CVPR 2025, spec ``algorithms.md`` §5.2): greedy max-min diversity on the visual features with
distance ``1 - cos``. Also holds the ``mode`` option and the reference count rule shared with mmr / zoo."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import diversity
from ..config import PrunerConfig
from ..errors import VTPruneError
from ..flops import register_overhead_flops
from ..registry import register_pruner
from ..view import ImageLayout, Selection, VisualView
from .base import Pruner

MODES = ("clean", "reference")


@dataclass
class ModeOption:
    """mode: ``"clean"`` (exact budget, documented choices) or ``"reference"`` (the reference code's rules)."""

    mode: str = "clean"

    def validate_mode(self) -> None:
        """Raise :class:`VTPruneError` naming the field."""
        if self.mode not in MODES:
            raise VTPruneError(f"mode={self.mode!r}: expected one of {MODES}")

    @property
    def reference(self) -> bool:
        return self.mode == "reference"


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


@register_pruner
class DivPrunePruner(RoundedReferenceCount, Pruner):
    """First pick: the token whose nearest neighbour is farthest; then farthest-first from the picked set.
    Uses the full V×V cosine matrix (the first pick needs it); each greedy step then costs O(V)."""

    config_class = DivPruneConfig

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        dtype = view.features.dtype if self.config.reference else torch.float32
        unit = diversity.unit_rows(view.features, dtype)
        sim = unit @ unit.T
        first = diversity.nearest_neighbour_seed(sim, second_smallest=self.config.reference)
        picks = diversity.max_min(diversity.from_matrix(sim), view.num_tokens, k, first, unit.device)
        return Selection(indices=torch.sort(picks).values)


register_overhead_flops("divprune")(lambda before, kept, dim: 2 * before * before * dim)  # the cosine matrix
