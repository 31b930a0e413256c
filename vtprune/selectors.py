"""Deprecated alias: the selectors moved to :mod:`vtprune.ops` in issue 16."""

import warnings

from .ops import adaptive_pool, lattice, pooled_grid, split_budget, top_k

warnings.warn("vtprune.selectors is deprecated; import vtprune.ops", DeprecationWarning, stacklevel=2)

__all__ = ["adaptive_pool", "lattice", "pooled_grid", "split_budget", "top_k"]
