"""Adapter lookup: the model's class decides its family."""

from __future__ import annotations

from torch import nn

from ..errors import VTPruneError
from .base import ImageSpans, ModelAdapter
from .llava import LlavaAdapter, LlavaNextAdapter
from .qwen import Qwen2_5_VLAdapter, Qwen2VLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter)


def supported_models() -> list[str]:
    """Class names vtprune can prune."""
    return [name for a in ADAPTERS for name in a.model_classes]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class (exact class name or a subclass of a supported one)."""
    for cls in type(model).__mro__:
        for adapter in ADAPTERS:
            if cls.__name__ in adapter.model_classes:
                return adapter(model)
    raise VTPruneError(f"unsupported model {type(model).__name__} "
                       f"(config.model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}); "
                       f"vtprune supports: {', '.join(supported_models())}. Pass the *ForConditionalGeneration "
                       "model, not its vision tower or language model.")


__all__ = ["ADAPTERS", "ImageSpans", "ModelAdapter", "adapter_for", "supported_models"]
