"""Registered pruners. Importing this package registers them all."""

from .base import Pruner
from .baselines import PoolConfig, RandomConfig, UniformConfig

__all__ = ["PoolConfig", "Pruner", "RandomConfig", "UniformConfig"]
