"""The local backend: batched greedy generation on a task with a pruner installed, measured by :class:`PruneProbe`.

Batches are fixed by the task order and the batch size (``batches``), and a data-parallel rank evaluates whole
batches (``batches[rank::world]``): every question sees the same batch neighbours and padding whatever the number of
processes, so predictions do not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import api
from ..capture import HINTS
from ..config import PrunerConfig
from ..measure import Timer, measure_prefill
from .probe import PruneProbe
from .schema import GenerationSpec, MeasureSpec, ModelSpec
from .tasks import Item, Task


def batches(n: int, size: int) -> list[list[int]]:
    """Question indices ``0..n-1`` cut into consecutive batches of ``size``."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


@dataclass
class ShardResult:
    """What one process produced for one cell: predictions by question index, per-batch measurements, and memory
    (peak bytes added by one prefill of its first batch; KV-cache bytes after it)."""

    predictions: dict[int, str] = field(default_factory=dict)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    peak_bytes: int | None = None
    kv_bytes: int | None = None


class LocalEvaluator:
    """Prompts, encodes and generates for one loaded model. Encoded batches of the current task are kept, so the
    cells of a sweep that share a model and a task (run one after another) decode and preprocess each image once."""

    def __init__(self, model: nn.Module, processor: Any, spec: ModelSpec, generation: GenerationSpec) -> None:
        self.model = model
        self.processor = processor
        self.spec = spec
        self.generation = generation
        self.device = next(model.parameters()).device
        self._cached_task: tuple[str, str] | None = None
        self._cache: dict[tuple[int, ...], dict[str, Any]] = {}

    def prompt(self, item: Item, task: Task) -> str:
        """The model's text for a question: its chat template with the images first, then the video (if any), or
        the ``prompt`` template."""
        text = item.text(task.prompt_suffix)
        if self.spec.prompt != "chat":
            return self.spec.prompt.replace("{question}", text)
        content = [{"type": "image"}] * len(item.images) + [{"type": "video"}] * bool(item.video)
        content.append({"type": "text", "text": text})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def encode(self, items: list[Item], task: Task) -> dict[str, Any]:
        """Processor outputs for a left-padded batch, on the model's device and dtype. A video goes to the processor
        as one uint8 array [frames, H, W, 3], as ``eval/testbed/evaluate.py`` passes the testbed's videos; images and
        videos are passed only when some item has them."""
        media: dict[str, Any] = {}
        if any(item.images for item in items):
            media["images"] = [[Image.open(p).convert("RGB") for p in item.images] for item in items]
        if any(item.video for item in items):
            media["videos"] = [video_array(item.video) for item in items if item.video]
        inputs = self.processor(text=[self.prompt(i, task) for i in items], **media, padding=True,
                                return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items() if torch.is_tensor(v)}

    def batch_inputs(self, task: Task, batch: list[int]) -> dict[str, Any]:
        """``encode`` of the questions ``batch`` of ``task``, from the cache when this task was encoded last; the
        cache holds one task and is replaced when another comes. A fresh dict each call (the tensors are shared);
        encoded outside inference mode, so that a batch first met inside ``run``'s loop is usable anywhere later."""
        if self._cached_task != (task.name, task.digest):
            self._cached_task, self._cache = (task.name, task.digest), {}
        key = tuple(batch)
        if key not in self._cache:
            with torch.inference_mode(False):
                self._cache[key] = self.encode([task.items[i] for i in batch], task)
        return dict(self._cache[key])

    def run(self, task: Task, my_batches: list[list[int]], config: PrunerConfig | None, measure: MeasureSpec,
            on_batch: Callable[[int], None] = lambda n: None) -> ShardResult:
        """Evaluate ``my_batches`` of ``task`` with ``config`` installed (``None`` = unpruned). One untimed prefill
        of the first batch warms up and, with ``measure.memory``, measures peak memory."""
        result = ShardResult()
        if not my_batches:
            return result
        timer = Timer(self.device)
        tokenizer = self.processor.tokenizer
        with api.apply(self.model, config) if config is not None else nullcontext() as handle:
            hint = _hinter(handle, task)
            hint(my_batches[0])
            warm = measure_prefill(self.model, self.batch_inputs(task, my_batches[0]), timer, memory=measure.memory)
            result.peak_bytes, result.kv_bytes = warm.peak_bytes, warm.kv_bytes
            with PruneProbe(self.model, handle, timer) as probe, torch.inference_mode():
                for batch in my_batches:
                    hint(batch)
                    inputs = self.batch_inputs(task, batch)
                    out = self.model.generate(**inputs, max_new_tokens=self.generation.max_new_tokens,
                                              do_sample=False, pad_token_id=tokenizer.pad_token_id)
                    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                    result.predictions.update({i: t.strip() for i, t in zip(batch, texts)})
                    on_batch(len(batch))
            result.measurements = probe.as_dicts()
        return result


def video_array(frames: list[Path]) -> np.ndarray:
    """A video's frame files as one uint8 array [frames, H, W, 3] (RGB)."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in frames])


def _hinter(handle: Any, task: Task) -> Callable[[list[int]], None]:
    """For pruners that read hints (informed references): a function giving a batch's questions' extra fields
    (``targets``, ``token_priority``, ...) to the handle; a no-op for every other pruner. A question's priorities are
    one list per visual token of its one image or video, or one such list per item (images, then the video)."""
    if handle is None or HINTS not in handle.pruner.needs:
        return lambda batch: None
    return lambda batch: handle.set_hints([task.items[i].extra for i in batch])
