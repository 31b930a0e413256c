"""Greedy k-center / farthest-point traversal, the stage-1 selector of ToDRE (spec ``algorithms.md`` §5.5).

Labelled "k-center (ToDRE stage 1)": ToDRE has no public code, so the seed and features are harness choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import diversity
from ..config import PrunerConfig
from ..flops import register_overhead_flops
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import Pruner


@dataclass
class KCenterConfig(PrunerConfig):
    """Keep k tokens by farthest-first traversal in ``1 - cos`` distance on the visual features (projected
    features before the LLM), seeded with the token of largest mean distance to all others."""

    name = "kcenter"


@register_pruner
class KCenterPruner(Pruner):
    """Same traversal as DivPrune except the seed, which needs no V×V matrix: O(k·V·D) in all."""

    config_class = KCenterConfig

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        unit = diversity.unit_rows(view.features)
        first = diversity.farthest_on_average_seed(unit)
        picks = diversity.max_min(diversity.on_demand(unit), view.num_tokens, k, first, unit.device)
        return Selection(indices=torch.sort(picks).values)


register_overhead_flops("kcenter")(lambda before, kept, dim: 2 * before * dim * kept)  # seed + one column per pick
