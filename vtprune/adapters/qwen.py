"""Qwen2-VL and Qwen2.5-VL: images are (t, h, w) patch grids merged 2x2; positions are M-RoPE triples."""

from __future__ import annotations

from typing import Any

import torch

from ..view import ImageLayout, Segment
from .base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    """One segment per temporal frame of ``image_grid_thw // merge``. Video tokens are left unpruned."""

    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    position_axes = 3

    def layouts(self, counts_per_row: list[int], inputs: dict[str, Any]) -> list[ImageLayout] | None:
        thw = inputs.get("image_grid_thw")
        if thw is None:
            return None
        m = self.model.config.vision_config.spatial_merge_size
        out = [ImageLayout((Segment(h // m, w // m),) * t) for t, h, w in torch.as_tensor(thw).tolist()]
        return out if sum(l.size for l in out) == sum(counts_per_row) else None


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: the same language-side structure as Qwen2-VL (window attention stays inside the ViT)."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
