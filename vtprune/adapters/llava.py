"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``)."""

from __future__ import annotations

from typing import Any

import torch

from ..view import ImageLayout, Segment
from .base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5: each image is a square patch grid (CLS dropped with the "default" feature strategy)."""

    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def _patch_grid(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def image_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        counts = super().image_counts(inputs)
        if counts is not None or inputs.get("pixel_values") is None:
            return counts
        pixels = inputs["pixel_values"]
        sizes = inputs.get("image_sizes")
        if sizes is not None:  # variable-resolution towers: one (h/p, w/p) grid per image
            patch = self.model.config.vision_config.patch_size
            return [(int(h) // patch) * (int(w) // patch) for h, w in torch.as_tensor(sizes).tolist()]
        g = self._patch_grid()
        per_image = g * g + (0 if self.model.config.vision_feature_select_strategy == "default" else 1)
        return [per_image] * pixels.shape[0]


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT AnyRes: a base-view grid, then the unpadded crop grid with one ``image_newline`` token
    ending each row. Newline tokens are visual tokens like the others (a pruner may drop them); the
    layout is read off the features themselves, where the newline embedding marks each row's end."""

    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def image_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        counts = ModelAdapter.image_counts(self, inputs)
        sizes = inputs.get("image_sizes")
        if counts is not None or sizes is None or inputs.get("pixel_values") is None:
            return counts
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
            unpad_image,
        )

        cfg, g = self.model.config, self._patch_grid()
        out = []
        for size in torch.as_tensor(sizes).tolist():
            if image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size) == 1:
                out.append(g * g + 1)
                continue
            nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            rows, cols = unpad_image(torch.empty(1, nph * g, npw * g), torch.tensor(size)).shape[1:]
            out.append(g * g + int(rows) * (int(cols) + 1))
        return out

    def layout(self, features: torch.Tensor, positions: torch.Tensor) -> ImageLayout:
        g = self._patch_grid()
        newline = self.backbone.image_newline.to(features.dtype)
        is_nl = (features[g * g:] == newline).all(-1).nonzero().flatten()
        rest = features.shape[0] - g * g
        if rest <= 0 or is_nl.numel() == 0:
            return ImageLayout.flat(features.shape[0])
        cols = int(is_nl[0])
        rows = rest // (cols + 1)
        if rows * (cols + 1) != rest or not torch.equal(is_nl, torch.arange(cols, rest, cols + 1, device=is_nl.device)):
            return ImageLayout.flat(features.shape[0])
        return ImageLayout((Segment(g, g), Segment(rows, cols, newline=True)))
