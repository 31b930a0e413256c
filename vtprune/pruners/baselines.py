"""Baselines every paper compares against: random, uniform lattice, spatial average pooling."""

from __future__ import annotations

from dataclasses import dataclass

from .. import scorers, selectors
from ..config import PrunerConfig
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import Pruner


@dataclass
class RandomConfig(PrunerConfig):
    """Keep a seeded uniform random subset (in original order)."""

    name = "random"


@dataclass
class UniformConfig(PrunerConfig):
    """Keep tokens on a regular lattice: ``round(linspace(0, V-1, k))`` in raster order."""

    name = "uniform"


@dataclass
class PoolConfig(PrunerConfig):
    """Average-pool each image grid down to the budget (see :func:`vtprune.selectors.adaptive_pool`)."""

    name = "pool"


@register_pruner
class RandomPruner(Pruner):
    """Random scores + top-k. One draw per (seed, token count), so batching never changes the choice."""

    config_class = RandomConfig

    def select(self, view: VisualView, k: int) -> Selection:
        return selectors.top_k(scorers.random_scores(view, self.generator(view)), k)


@register_pruner
class UniformPruner(Pruner):
    """Feature-free lattice sampling."""

    config_class = UniformConfig

    def select(self, view: VisualView, k: int) -> Selection:
        return selectors.lattice(view.num_tokens, k, device=view.features.device)


@register_pruner
class PoolPruner(Pruner):
    """Spatial average pooling; pooled tokens sit at their window's top-left position."""

    config_class = PoolConfig

    def select(self, view: VisualView, k: int) -> Selection:
        return selectors.adaptive_pool(view.features, view.layout, k)
