"""Pool: spatial average pooling of each image grid down to the budget."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..config import PrunerConfig
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import Pruner


@dataclass
class PoolConfig(PrunerConfig):
    """Average-pool each image grid down to the budget (see :func:`vtprune.ops.adaptive_pool`)."""

    name = "pool"


@register_pruner
class PoolPruner(Pruner):
    """Spatial average pooling; pooled tokens sit at their window's top-left position.
    See docs/algorithms.md, section ``pool``."""

    config_class = PoolConfig

    def select(self, view: VisualView, k: int) -> Selection:
        return ops.adaptive_pool(view.features, view.layout, k)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``V·D``: about one add per pooled feature element."""
        return before * dim
