"""Registered pruners. Importing this package registers them all."""

from .base import Pruner
from .baselines import PoolConfig, RandomConfig, UniformConfig
from .dart import DARTConfig
from .fastv import FastVConfig
from .pagerank import PagerankConfig
from .visionzip import VisionZipConfig
from .vtc_cls import VTCCLSConfig
from .divprune import DivPruneConfig
from .kcenter import KCenterConfig
from .mmr import MMRConfig
from .zoo import ZooConfig

__all__ = ["PoolConfig", "Pruner", "RandomConfig", "UniformConfig"]
__all__ += ["DivPruneConfig", "KCenterConfig", "MMRConfig", "ZooConfig"]
__all__ += ["DARTConfig", "FastVConfig", "PagerankConfig", "VTCCLSConfig", "VisionZipConfig"]
