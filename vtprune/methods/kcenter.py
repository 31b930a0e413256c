"""Greedy k-center / farthest-point traversal, the stage-1 selector of ToDRE (docs/algorithms.md, section ``kcenter``).

Labelled "k-center (ToDRE stage 1)": ToDRE has no public code, so the seed and features are harness choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..config import PrunerConfig
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import Pruner


@dataclass
class KCenterConfig(PrunerConfig):
    """Keep k tokens by farthest-first traversal in ``1 - cos`` distance on the visual features (projected
    features before the LLM), seeded with the token of largest mean distance to all others."""

    name = "kcenter"


def farthest_on_average_seed(unit: torch.Tensor) -> torch.Tensor:
    """k-center seed: the token with the largest mean ``1 - cos`` to all others, in O(V·D) through the sum
    of the unit rows (mean over j≠i of cos = (u_i·Σu - u_i·u_i) / (V - 1))."""
    self_sim = (unit * unit).sum(-1)
    return (unit @ unit.sum(0) - self_sim).argmin()


@register_pruner
class KCenterPruner(Pruner):
    """Same traversal as DivPrune except the seed, which needs no V×V matrix: O(k·V·D) in all.
    See docs/algorithms.md, section ``kcenter``."""

    config_class = KCenterConfig

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        unit = ops.unit_rows(view.features)
        first = farthest_on_average_seed(unit)
        picks = ops.max_min(ops.on_demand(unit), view.num_tokens, k, first, unit.device)
        return Selection(indices=torch.sort(picks).values)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``2·V·D·k``: the seed (one product with the summed rows) and one similarity column per pick."""
        return 2 * before * dim * kept
