"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``)."""

from __future__ import annotations

from typing import Any

import torch

from torch import nn

from ..capture import InputCapture, MLPProjector, ProjectorInput, VisionQK
from ..errors import VTPruneError
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

    # ---- vision attention (CLIP-style towers with a [CLS] token) ------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.backbone.vision_tower

    def _encoder_layers(self) -> nn.ModuleList:
        tower = self.backbone.vision_tower
        return (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers

    @property
    def num_vision_layers(self) -> int:
        return len(self._encoder_layers())

    def vision_attention(self, layer: int) -> nn.Module:
        return self._encoder_layers()[layer].self_attn

    def _views_qk(self, layer: int, capture: InputCapture) -> tuple[torch.Tensor, torch.Tensor, float]:
        """q/k [views, H, 1+P, hd] of every encoded view (token 0 is [CLS])."""
        attn = self.vision_attention(layer)
        hidden = capture.tensor("hidden_states", call=0)
        v, n, _ = hidden.shape
        q = attn.q_proj(hidden).view(v, n, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(v, n, -1, attn.head_dim).transpose(1, 2)
        return q, k, float(attn.scale)

    def _view(self, q: torch.Tensor, k: torch.Tensor, scaling: float, token_of_patch: torch.Tensor) -> VisionQK:
        return VisionQK(query=q[:, 1:], key=k[:, 1:], scaling=scaling, token_of_patch=token_of_patch,
                        cls_query=q[:, 0], cls_key=k[:, 0])

    def _token_maps(self, n_views: int, layouts: list[ImageLayout], device: torch.device
                    ) -> list[list[tuple[int, torch.Tensor]]]:
        """Per image: (encoder view index, token index of each of its patches) — one view per image."""
        if self.model.config.vision_feature_select_strategy != "default":
            raise VTPruneError("vision-encoder and projector signals need vision_feature_select_strategy='default'")
        if n_views != len(layouts):
            raise VTPruneError(f"the vision tower encoded {n_views} images but the prompt holds {len(layouts)}")
        return [[(i, torch.arange(layout.size, device=device))] for i, layout in enumerate(layouts)]

    def vision_qk(self, layer: int, capture: InputCapture, tower: InputCapture,
                  layouts: list[ImageLayout]) -> list[list[VisionQK]]:
        q, k, scaling = self._views_qk(layer, capture)
        return [[self._view(q[v], k[v], scaling, t) for v, t in maps]
                for maps in self._token_maps(q.shape[0], layouts, q.device)]

    # ---- projector ------------------------------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        return self.backbone.multi_modal_projector

    def projector_inputs(self, capture: InputCapture, tower: InputCapture, layouts: list[ImageLayout]
                         ) -> list[ProjectorInput]:
        x = capture.tensor("image_features", call=0)  # [views, P, d_v], [CLS] already dropped; later calls re-project
        out = []
        for layout, maps in zip(layouts, self._token_maps(x.shape[0], layouts, x.device)):
            inputs = x.new_zeros(layout.size, 1, x.shape[-1])
            valid = torch.zeros(layout.size, dtype=torch.bool, device=x.device)
            for v, token in maps:
                ok = token >= 0
                inputs[token[ok], 0] = x[v][ok]
                valid[token[ok]] = True
            out.append(ProjectorInput(inputs=inputs, valid=valid, project=self._project, mlp=self._mlp()))
        return out

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x[:, 0])

    def _mlp(self) -> MLPProjector | None:
        p = self.projector
        if all(hasattr(p, n) for n in ("linear_1", "act", "linear_2")):
            return MLPProjector(first=p.linear_1, act=p.act, last=p.linear_2)
        return None


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

    def _crop_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """The AnyRes crop grid (views down, views across) an unpadded rows x cols grid came from: the
        smallest configured grid that holds it with one side exactly filled (unpadding trims one side)."""
        cfg, g = self.model.config, self._patch_grid()
        size = cfg.vision_config.image_size
        grids = sorted({(h // size, w // size) for h, w in cfg.image_grid_pinpoints}, key=lambda s: (s[0] * s[1], s))
        for nph, npw in grids:
            if (cols == npw * g and rows <= nph * g) or (rows == nph * g and cols <= npw * g):
                return nph, npw
        raise VTPruneError(f"no AnyRes grid in image_grid_pinpoints explains a {rows}x{cols} crop grid")

    def _token_maps(self, n_views: int, layouts: list[ImageLayout], device: torch.device
                    ) -> list[list[tuple[int, torch.Tensor]]]:
        """Per image: the base view, then the AnyRes crops in raster order, each with the token index of
        its patches in the packed image (-1 where unpadding drops a patch)."""
        g = self._patch_grid()
        r, c = torch.arange(g, device=device)[:, None], torch.arange(g, device=device)[None, :]
        out, view = [], 0
        for layout in layouts:
            base, crops = layout.segments[0], layout.segments[1]
            maps = [(view, (r * g + c).flatten())]
            view += 1
            if crops.cols > 0:
                nph, npw = self._crop_grid(crops.rows, crops.cols)
                r0, c0 = (nph * g - crops.rows) // 2, (npw * g - crops.cols) // 2
                for i in range(nph):
                    for j in range(npw):
                        rr, cc = i * g + r - r0, j * g + c - c0
                        inside = (rr >= 0) & (rr < crops.rows) & (cc >= 0) & (cc < crops.cols)
                        token = base.size + rr * (crops.cols + 1) + cc
                        maps.append((view, token.where(inside, -1).flatten()))
                        view += 1
            out.append(maps)
        if view != n_views:
            raise VTPruneError(f"the vision tower encoded {n_views} views but the images' layouts account for {view}")
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
