"""lmms-eval entry point (group ``lmms_eval.models``): the pruned variants of lmms-eval's own wrappers, one model id
per wrapper that a registered family names (:class:`vtprune.models.LmmsWrapper`).

Never imports :mod:`vtprune.lmms_models` nor lmms-eval's wrappers: lmms-eval imports every entry point whenever
``lmms_eval.models`` is imported, and resolves the class paths only when a model is used.

    lmms-eval --model vtprune_llava_hf --model_args pretrained=PATH,pruner=uniform,keep=64 --tasks T
"""

from __future__ import annotations

from typing import Any

from .models import lmms_wrappers

#: model id -> (simple class path, chat class path); ``None`` where lmms-eval has no such wrapper
MODELS: dict[str, tuple[str | None, str | None]] = {}
for _wrapper in lmms_wrappers():
    _paths = {simple: f"vtprune.lmms_models.{_wrapper.pruned_class_name(simple)}" for simple, _ in _wrapper.bases()}
    MODELS[_wrapper.model_id] = (_paths.get(True), _paths.get(False))


def manifests() -> list[Any]:
    """The :class:`ModelManifest` of every vtprune model id."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=simple, chat_class_path=chat)
            for name, (simple, chat) in MODELS.items()]
