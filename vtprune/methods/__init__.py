"""The pruning methods, one module each (math, config, count rule, ``overhead_flops``). Importing this package
registers them all; see docs/algorithms.md for each method and :mod:`vtprune.ops` for the shared building blocks."""

from .base import Pruner, ScorerPruner
from .cdpruner import CDPrunerConfig
from .dart import DARTConfig
from .divprune import DivPruneConfig
from .dycoke import DyCokeConfig
from .evs import EVSConfig
from .fastv import FastVConfig
from .fastvid import FastVIDConfig
from .informed import InformedConfig
from .kcenter import KCenterConfig
from .mmr import MMRConfig
from .pool import PoolConfig
from .pyramiddrop import PyramidDropConfig
from .random import RandomConfig
from .sparsevlm import SparseVLMConfig
from .uniform import UniformConfig
from .visionzip import VisionZipConfig
from .vispruner import VisPrunerConfig
from .vtc_cls import VTCCLSConfig
from .zero_tprune import PagerankConfig, ZeroTPruneConfig
from .zoo import ZooConfig

__all__ = [
    "CDPrunerConfig", "DARTConfig", "DivPruneConfig", "DyCokeConfig", "EVSConfig", "FastVConfig", "FastVIDConfig", "InformedConfig", "KCenterConfig", "MMRConfig",
    "PagerankConfig", "PoolConfig", "Pruner", "PyramidDropConfig", "RandomConfig", "ScorerPruner", "SparseVLMConfig", "UniformConfig", "VTCCLSConfig",
    "VisPrunerConfig", "VisionZipConfig", "ZeroTPruneConfig", "ZooConfig",
]
