"""The family registry: the one place that lists the model families vtprune supports.

A family is a :class:`ModelAdapter` subclass (one file per family in this package) registered with
:func:`register_family`. Everything else that needs the families — adapter lookup, FLOPs, the benchmark,
``vtprune.testing``, the sweep schema, the lmms-eval plugin — iterates this registry.
"""

from __future__ import annotations

from torch import nn

from ..errors import VTPruneError
from .base import ImageSpans, LmmsWrapper, ModelAdapter, SyntheticImage, VisionWork
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter

_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_family(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register ``adapter`` under its ``family`` name (usable as a class decorator); a later registration of
    the same name replaces the earlier one."""
    if not adapter.family or not adapter.model_classes:
        raise VTPruneError(f"{adapter.__name__} needs a family name and at least one model class to be registered")
    _REGISTRY[adapter.family] = adapter
    return adapter


def family_class(family: str) -> type[ModelAdapter]:
    """The adapter class of ``family`` (a registered name, which is also the config's ``model_type``), or of the
    family one of whose ``model_classes`` has that ``model_type`` (e.g. an MoE variant served by the same adapter)."""
    if family in _REGISTRY:
        return _REGISTRY[family]
    import transformers

    for adapter in _REGISTRY.values():
        for name in adapter.model_classes[1:]:
            config_class = getattr(getattr(transformers, name, None), "config_class", None)
            if family is not None and getattr(config_class, "model_type", None) == family:
                return adapter
    raise VTPruneError(f"unknown model family {family!r}; registered: {', '.join(_REGISTRY)}")


def registered_families() -> list[str]:
    """Names of the registered families, in registration order (built-in ones and any registered later)."""
    return list(_REGISTRY)


def supported_models() -> list[str]:
    """Class names vtprune can prune."""
    return [name for a in _REGISTRY.values() for name in a.model_classes]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class (exact class name or a subclass of a supported one; the most derived
    class that some family names wins)."""
    for cls in type(model).__mro__:
        for adapter in _REGISTRY.values():
            if cls.__name__ in adapter.model_classes:
                return adapter(model)
    raise VTPruneError(f"unsupported model {type(model).__name__} "
                       f"(config.model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}); "
                       f"vtprune supports: {', '.join(supported_models())}. Pass the *ForConditionalGeneration "
                       "model, not its vision tower or language model.")


def lmms_wrappers() -> list[LmmsWrapper]:
    """The lmms-eval wrappers of the registered families, one per model id (families may share one)."""
    return list({a.lmms.model_id: a.lmms for a in _REGISTRY.values() if a.lmms is not None}.values())


for _adapter in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter, InternVLAdapter, Qwen3_5Adapter,
                 LlavaOnevisionAdapter, Qwen3VLAdapter, Gemma3Adapter):
    register_family(_adapter)

#: the built-in families, in registry order
FAMILIES: tuple[str, ...] = tuple(_REGISTRY)

__all__ = [
    "FAMILIES", "Gemma3Adapter", "ImageSpans", "InternVLAdapter", "LlavaAdapter", "LlavaNextAdapter",
    "LlavaOnevisionAdapter", "LmmsWrapper", "ModelAdapter", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3_5Adapter",
    "Qwen3VLAdapter", "SyntheticImage", "VisionWork", "adapter_for", "family_class", "lmms_wrappers", "register_family",
    "registered_families", "supported_models",
]
