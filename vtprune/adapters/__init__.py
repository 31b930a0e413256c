"""Deprecated alias of :mod:`vtprune.models` (renamed in issue 16): the family registry and one module per
family live there now."""

import warnings

from ..models import (
    FAMILIES,
    ImageSpans,
    ModelAdapter,
    adapter_for,
    family_class,
    supported_models,
)

warnings.warn("vtprune.adapters is deprecated; import vtprune.models", DeprecationWarning, stacklevel=2)

#: the registered adapter classes, in registry order (``vtprune.models.family_class`` looks one up by name)
ADAPTERS: tuple[type[ModelAdapter], ...] = tuple(family_class(f) for f in FAMILIES)

__all__ = ["ADAPTERS", "ImageSpans", "ModelAdapter", "adapter_for", "supported_models"]
