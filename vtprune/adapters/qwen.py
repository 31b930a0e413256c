"""Qwen2-VL and Qwen2.5-VL: images are (t, h, w) patch grids merged 2x2; positions are M-RoPE triples."""

from __future__ import annotations

from typing import Any

import torch

from torch import nn

from ..capture import InputCapture, ProjectorInput, VisionQK, rotate
from ..errors import VTPruneError
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

    # ---- vision attention (no [CLS]; patches packed over all images, merged 2x2 afterwards) ---------
    @property
    def vision_tower(self) -> nn.Module:
        return self.backbone.visual

    @property
    def num_vision_layers(self) -> int:
        return len(self.backbone.visual.blocks)

    def vision_attention(self, layer: int) -> nn.Module:
        return self.backbone.visual.blocks[layer].attn

    def _patch_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """For each patch in the encoder's sequence order, the index of the merged token it feeds
        (global over all images). Qwen2-VL keeps each 2x2 group contiguous, groups in raster order."""
        m2 = self.model.config.vision_config.spatial_merge_size ** 2
        total = int(grid_thw.prod(-1).sum())
        return torch.arange(total, device=grid_thw.device) // m2

    def _token_maps(self, tower: InputCapture, layouts: list[ImageLayout]) -> list[tuple[slice, torch.Tensor]]:
        """Per image: its slice of the encoder's packed patch sequence and the image-local token index
        of each of those patches."""
        grid_thw = tower.tensor("grid_thw", 1, call=0)  # the first pass after the tower's pre-hook: images
        sizes = grid_thw.prod(-1).tolist()
        if len(sizes) != len(layouts):
            raise VTPruneError(f"the vision tower encoded {len(sizes)} images but the prompt holds {len(layouts)}")
        token = self._patch_order(grid_thw)
        m2 = self.model.config.vision_config.spatial_merge_size ** 2
        out, start, first_token = [], 0, 0
        for size in sizes:
            out.append((slice(start, start + size), token[start:start + size] - first_token))
            start, first_token = start + size, first_token + size // m2
        return out

    def vision_qk(self, layer: int, capture: InputCapture, tower: InputCapture,
                  layouts: list[ImageLayout]) -> list[list[VisionQK]]:
        attn = self.vision_attention(layer)
        hidden = capture.tensor("hidden_states", call=0)
        cos, sin = capture.tensor("position_embeddings", 2, call=0)
        n = hidden.shape[0]
        qkv = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 2, 0, 3)  # [3, H, n, hd]
        cos, sin = cos.unsqueeze(0).float(), sin.unsqueeze(0).float()
        q, k = (rotate(t.float(), cos, sin).to(hidden.dtype) for t in (qkv[0], qkv[1]))
        maps = self._token_maps(tower, layouts)
        if maps and maps[-1][0].stop != n:
            raise VTPruneError("captured vision attention inputs do not match the images' grid_thw")
        return [[VisionQK(query=q[:, sl], key=k[:, sl], scaling=float(attn.scaling), token_of_patch=t)]
                for sl, t in maps]

    # ---- projector (the 2x2 PatchMerger) ----------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        return self.backbone.visual.merger

    def projector_inputs(self, capture: InputCapture, tower: InputCapture, layouts: list[ImageLayout]
                         ) -> list[ProjectorInput]:
        x = capture.tensor("x", call=0)  # [patches, d_v] in encoder order
        m2 = self.model.config.vision_config.spatial_merge_size ** 2
        out = []
        for (sl, token), layout in zip(self._token_maps(tower, layouts), layouts):
            order = torch.sort(token, stable=True).indices  # group each token's patches, encoder order kept
            inputs = x[sl][order].view(layout.size, m2, x.shape[-1])
            valid = torch.ones(layout.size, dtype=torch.bool, device=x.device)
            out.append(ProjectorInput(inputs=inputs, valid=valid, project=self._project))
        return out

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x.reshape(-1, x.shape[-1]))


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: the same language-side structure as Qwen2-VL (window attention stays inside the ViT)."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def vision_full_attention_layers(self) -> list[int]:
        return list(self.model.config.vision_config.fullatt_block_indexes)

    def _patch_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL permutes 2x2 groups into window order inside the encoder (``window_index``)."""
        from transformers.vision_utils import get_vision_window_index

        vc = self.model.config.vision_config
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=vc.spatial_merge_size,
                                                  window_size=vc.window_size, patch_size=vc.patch_size, kwargs={})
        m2 = vc.spatial_merge_size ** 2
        return window_index.to(grid_thw.device).repeat_interleave(m2)
