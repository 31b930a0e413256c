"""vtprune: training-free visual-token pruning for stock ``transformers`` VLMs, applied through hooks.

    handle = vtprune.apply(model, "random", keep=0.25)
    out = model.generate(**inputs)
    handle.remove()
"""

from . import methods as _methods  # noqa: F401  (registers the built-in pruners)
from .models import supported_models
from .api import PruneHandle, apply
from .config import PrunerConfig
from .errors import VTPruneError
from .flops import FlopsReport, flops_from_stats, register_overhead_flops
from .methods import (
    CDPrunerConfig, DARTConfig, DivPruneConfig, FastVConfig, InformedConfig, KCenterConfig, MMRConfig, PagerankConfig,
    PoolConfig, Pruner, PyramidDropConfig, RandomConfig, ScorerPruner, SparseVLMConfig, UniformConfig, VisionZipConfig,
    VisPrunerConfig, VTCCLSConfig, ZeroTPruneConfig, ZooConfig,
)
from .registry import list_pruners, pruner_aliases, register_pruner
from .stats import PruneStats, SampleStats
from .view import ImageLayout, Segment, Selection, VisualView

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """Deprecated submodules (``vtprune.selectors``, ``vtprune.pruners``) stay reachable as attributes."""
    if name in ("selectors", "pruners"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CDPrunerConfig", "DARTConfig", "DivPruneConfig", "FastVConfig", "InformedConfig", "KCenterConfig", "MMRConfig",
    "PagerankConfig", "ScorerPruner", "VTCCLSConfig", "VisPrunerConfig", "VisionZipConfig", "ZeroTPruneConfig",
    "PyramidDropConfig", "SparseVLMConfig", "ZooConfig",
    "FlopsReport", "ImageLayout", "PoolConfig", "PruneHandle", "PruneStats", "Pruner", "PrunerConfig", "RandomConfig",
    "SampleStats", "Segment", "Selection", "UniformConfig", "VTPruneError", "VisualView", "apply",
    "flops_from_stats", "list_pruners", "pruner_aliases", "register_overhead_flops", "register_pruner",
    "supported_models",
]
