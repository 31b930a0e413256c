"""Uniform: feature-free lattice sampling of an image's tokens."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..config import PrunerConfig
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import Pruner


@dataclass
class UniformConfig(PrunerConfig):
    """Keep tokens on a regular lattice: ``round(linspace(0, V-1, k))`` in raster order."""

    name = "uniform"


@register_pruner
class UniformPruner(Pruner):
    """Feature-free lattice sampling (:func:`vtprune.ops.lattice`). See docs/algorithms.md, section ``uniform``."""

    config_class = UniformConfig

    def select(self, view: VisualView, k: int) -> Selection:
        return ops.lattice(view.num_tokens, k, device=view.features.device)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """0: index arithmetic only."""
        return 0
