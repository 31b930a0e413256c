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

    def layouts(self, counts_per_row: list[int], inputs: dict[str, Any]) -> list[ImageLayout] | None:
        sizes = inputs.get("image_sizes")
        patch = self.model.config.vision_config.patch_size
        if sizes is not None:  # variable-resolution towers (e.g. Pixtral-style): one (h/p, w/p) grid each
            return [ImageLayout((Segment(int(h) // patch, int(w) // patch),)) for h, w in torch.as_tensor(sizes).tolist()]
        g = self._patch_grid()
        per_image = g * g + (0 if self.model.config.vision_feature_select_strategy == "default" else 1)
        if any(c % per_image for c in counts_per_row):
            return None
        layout = ImageLayout((Segment(g, g),)) if per_image == g * g else ImageLayout.flat(per_image)
        return [layout] * (sum(counts_per_row) // per_image)


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT AnyRes: a base-view grid, then the unpadded crop grid with one ``image_newline`` token
    ending each row. Newline tokens are visual tokens like the others (a pruner may drop them)."""

    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def layouts(self, counts_per_row: list[int], inputs: dict[str, Any]) -> list[ImageLayout] | None:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
            unpad_image,
        )

        sizes = inputs.get("image_sizes")
        cfg = self.model.config
        if sizes is None or cfg.vision_feature_select_strategy != "default":
            return None
        g = self._patch_grid()
        out = []
        for size in torch.as_tensor(sizes).tolist():
            n_views = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            if n_views == 1:
                out.append(ImageLayout((Segment(g, g), Segment(1, 0, newline=True))))
                continue
            nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            rows, cols = unpad_image(torch.empty(1, nph * g, npw * g), torch.tensor(size)).shape[1:]
            out.append(ImageLayout((Segment(g, g), Segment(int(rows), int(cols), newline=True))))
        if sum(l.size for l in out) != sum(counts_per_row):
            return None
        return out
