"""Deprecated alias of :mod:`vtprune.methods` (renamed in issue 16); ``vtprune.pruners.<module>`` still
imports the module of the same name there (``pagerank`` -> ``zero_tprune``, ``baselines`` -> ``random``)."""

import importlib
import sys
import warnings

from ..methods import *  # noqa: F403
from ..methods import __all__  # noqa: F401

warnings.warn("vtprune.pruners is deprecated; import vtprune.methods", DeprecationWarning, stacklevel=2)

#: old submodule name -> its module under vtprune.methods
_MOVED = {"base": "base", "baselines": "random", "dart": "dart", "divprune": "divprune", "fastv": "fastv",
          "informed": "informed", "kcenter": "kcenter", "mmr": "mmr", "pagerank": "zero_tprune",
          "visionzip": "visionzip", "vtc_cls": "vtc_cls", "zoo": "zoo"}
for _old, _new in _MOVED.items():
    _module = importlib.import_module(f"vtprune.methods.{_new}")
    sys.modules[f"{__name__}.{_old}"] = _module
    globals()[_old] = _module
