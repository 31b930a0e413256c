"""Registered pruners. Importing this package registers them all."""

from .base import Pruner
from .baselines import PoolConfig, RandomConfig, UniformConfig
from .dart import DARTConfig
from .divprune import DivPruneConfig
from .fastv import FastVConfig
from .informed import InformedConfig
from .kcenter import KCenterConfig
from .mmr import MMRConfig
from .pagerank import PagerankConfig
from .visionzip import VisionZipConfig
from .vtc_cls import VTCCLSConfig
from .zoo import ZooConfig

__all__ = [
    "DARTConfig", "DivPruneConfig", "FastVConfig", "InformedConfig", "KCenterConfig", "MMRConfig", "PagerankConfig",
    "PoolConfig", "Pruner", "RandomConfig", "UniformConfig", "VTCCLSConfig", "VisionZipConfig", "ZooConfig",
]
