"""Qwen2-VL and Qwen2.5-VL: images are (t, h, w) patch grids merged 2x2; positions are M-RoPE triples."""

from __future__ import annotations

from typing import Any

import torch

from ..view import ImageLayout, Segment
from .base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    """Layouts are read off the M-RoPE (t, h, w) position ids of each image's tokens, which the model
    computed from ``image_grid_thw`` on the full sequence. Video tokens are left unpruned."""

    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    position_axes = 3

    def image_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        counts = super().image_counts(inputs)
        thw = inputs.get("image_grid_thw")
        if counts is not None or thw is None:
            return counts
        m = self.model.config.vision_config.spatial_merge_size
        return [t * (h // m) * (w // m) for t, h, w in torch.as_tensor(thw).tolist()]

    def layout(self, features: torch.Tensor, positions: torch.Tensor) -> ImageLayout:
        n = features.shape[0]
        if positions.shape[0] < 3:
            return ImageLayout.flat(n)
        t, h, w = (int(p.max() - p.min()) + 1 for p in positions[-3:])
        if t * h * w != n:
            return ImageLayout.flat(n)
        return ImageLayout((Segment(h, w),) * t)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: the same language-side structure as Qwen2-VL (window attention stays inside the ViT)."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
