"""lmms-eval entry point (group ``lmms_eval.models``): the pruned variants of lmms-eval's own wrappers.

Kept free of torch and model imports: lmms-eval imports every entry point whenever ``lmms_eval.models`` is
imported, and resolves the class paths only when a model is used.

    lmms-eval --model vtprune_llava_hf --model_args pretrained=PATH,pruner=uniform,keep=64 --tasks T
"""

from __future__ import annotations

from typing import Any

#: model id -> (simple class path, chat class path); ``None`` where lmms-eval has no such wrapper
MODELS: dict[str, tuple[str | None, str | None]] = {
    "vtprune_llava_hf": ("vtprune.lmms_models.PrunedLlavaHfSimple", "vtprune.lmms_models.PrunedLlavaHf"),
    "vtprune_qwen2_vl": ("vtprune.lmms_models.PrunedQwen2VL", None),
    "vtprune_qwen2_5_vl": ("vtprune.lmms_models.PrunedQwen25VLSimple", "vtprune.lmms_models.PrunedQwen25VL"),
}


def manifests() -> list[Any]:
    """The :class:`ModelManifest` of every vtprune model id."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=simple, chat_class_path=chat)
            for name, (simple, chat) in MODELS.items()]
