"""Load a sweep's model + processor from its :class:`~.schema.ModelSpec` (local files only, never a hub).

``tiny`` models are saved once under ``OUTPUT/models/tiny-ARCH-seed-SEED`` (named by what generates their weights, so
a rerun with another seed never loads an earlier seed's model) and then loaded like any saved model, so the local
and the lmms-eval backend see the same weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..benchmark import build_model
from ..models import family_class
from .schema import ModelSpec


def device_for(spec: ModelSpec, local_rank: int = 0) -> str:
    """``auto`` -> this process's GPU when there is one, else ``cpu``."""
    if spec.device != "auto":
        return spec.device
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def saved_dir(spec: ModelSpec, output_dir: Path, seed: int) -> Path | None:
    """Where the model's weights are on disk (``None`` for a random-weight model built from a config); a ``tiny``
    model's folder is keyed by its architecture and the ``seed`` that drew its weights."""
    if spec.tiny is not None:
        return output_dir / "models" / f"tiny-{spec.tiny}-seed-{seed}"
    return None if spec.random_weights else Path(spec.path)


def materialize_tiny(spec: ModelSpec, output_dir: Path, seed: int) -> Path:
    """Save the ``tiny`` model of ``seed`` and its processor once (built aside, renamed into place)."""
    from ..testing import tiny_vlm

    target = saved_dir(spec, output_dir, seed)
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tv = tiny_vlm(spec.tiny, attn_implementation=spec.attn, seed=seed)
    # like a released checkpoint, give the tokenizer an end-of-sequence token (lmms-eval's Qwen2-VL wrapper decodes
    # it); the model never emits it, as generation suppresses every special token of the tiny vocabulary
    tv.processor.tokenizer.eos_token = family_class(spec.tiny).tiny_eos
    tv.model.save_pretrained(tmp)
    tv.processor.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_processor(directory: str | Path) -> Any:
    """A saved processor, left-padding (batched generation)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return processor


def load(spec: ModelSpec, output_dir: Path, device: str, seed: int) -> tuple[nn.Module, Any]:
    """(model in eval mode on ``device``, processor)."""
    if spec.tiny is not None:
        source = materialize_tiny(spec, output_dir, seed)
        model = build_model(str(source), dtype=spec.dtype, device=device, attn_implementation=spec.attn)
        return model, load_processor(source)
    source = spec.path or spec.config
    model = build_model(source, random_weights=spec.random_weights, dtype=spec.dtype, device=device,
                        attn_implementation=spec.attn, seed=seed)
    return model, load_processor(spec.processor or spec.path)
