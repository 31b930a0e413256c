"""vtprune: training-free visual-token pruning for stock ``transformers`` VLMs, applied through hooks.

    handle = vtprune.apply(model, "random", keep=0.25)
    out = model.generate(**inputs)
    handle.remove()
"""

from . import pruners as _pruners  # noqa: F401  (registers the built-in pruners)
from .adapters import supported_models
from .api import PruneHandle, apply
from .config import PrunerConfig
from .errors import VTPruneError
from .flops import FlopsReport, flops_from_stats, register_overhead_flops
from .pruners import (
    DARTConfig, DivPruneConfig, FastVConfig, InformedConfig, KCenterConfig, MMRConfig, PagerankConfig, PoolConfig,
    Pruner, RandomConfig, UniformConfig, VisionZipConfig, VTCCLSConfig, ZooConfig,
)
from .registry import list_pruners, register_pruner
from .stats import PruneStats, SampleStats
from .view import ImageLayout, Segment, Selection, VisualView

__version__ = "0.1.0"

__all__ = [
    "DARTConfig", "DivPruneConfig", "FastVConfig", "InformedConfig", "KCenterConfig", "MMRConfig",
    "PagerankConfig", "VTCCLSConfig", "VisionZipConfig", "ZooConfig",
    "FlopsReport", "ImageLayout", "PoolConfig", "PruneHandle", "PruneStats", "Pruner", "PrunerConfig", "RandomConfig",
    "SampleStats", "Segment", "Selection", "UniformConfig", "VTPruneError", "VisualView", "apply",
    "flops_from_stats", "list_pruners", "register_overhead_flops", "register_pruner", "supported_models",
]
