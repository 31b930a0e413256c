"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA's tower and projector on AnyRes views."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import VTPruneError
from ..view import ImageLayout, Segment
from .base import ModelAdapter, SyntheticImage, VisionWork
from .llava import CHAT_TEMPLATE, LlavaAdapter


@functools.lru_cache(maxsize=256)
def _anyres_tokens(side: int, patch: int, pins: tuple[tuple[int, int], ...], size: tuple[int, int]) -> int:
    """:meth:`LlavaNextAdapter.anyres_tokens` for hashable arguments, remembered: every prefill asks it per image, and
    working it out runs a dozen tensor ops."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    g = side // patch
    if image_size_to_num_patches(list(size), [list(p) for p in pins], side) == 1:
        return g * g + 1
    nph, npw = get_anyres_image_grid_shape(list(size), [list(p) for p in pins], side)
    rows, cols = unpad_image(torch.empty(1, nph * g, npw * g), torch.tensor(size)).shape[1:]
    return g * g + int(rows) * (int(cols) + 1)


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT AnyRes: a base-view grid, then the unpadded crop grid with one ``image_newline`` token
    ending each row. Newline tokens are visual tokens like the others (a pruner may drop them); the
    layout is read off the features themselves, where the newline embedding marks each row's end."""

    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    bench_configs = ("llava-next-7b",)

    def image_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        counts = ModelAdapter.image_counts(self, inputs)
        sizes = inputs.get("image_sizes")
        if counts is not None or sizes is None or inputs.get("pixel_values") is None:
            return counts
        return [self.anyres_tokens(self.model.config, size) for size in torch.as_tensor(sizes).tolist()]

    @staticmethod
    def anyres_tokens(config: Any, size: list[int]) -> int:
        """Visual tokens of one image of ``size`` [H, W]: the base view's grid, then (when AnyRes gives it more
        than one view) the unpadded crop grid with one newline per row; a lone view adds one newline."""
        vc = config.vision_config
        return _anyres_tokens(vc.image_size, vc.patch_size, tuple(map(tuple, config.image_grid_pinpoints)),
                              tuple(size))

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

    # ---- family level: FLOPs, tiny model, benchmark image -----------------------------------------------
    @classmethod
    def vision_work(cls, config: Any, inputs: Mapping[str, Any]) -> VisionWork:
        """Every AnyRes view the tower encodes (base view + crops), before unpadding."""
        from transformers.models.llava_next.modeling_llava_next import (
            image_size_to_num_patches,
        )

        if inputs.get("pixel_values") is None:
            return VisionWork()
        side = config.vision_config.image_size
        sizes = torch.as_tensor(inputs["image_sizes"]).tolist()
        return VisionWork(views=sum(image_size_to_num_patches(s, config.image_grid_pinpoints, side) for s in sizes))

    @classmethod
    def tiny_parts(cls, num_layers: int) -> tuple[Any, Any]:
        """LLaVA's tiny model with AnyRes grids of 1x2, 2x1 and 2x2 views of 56 px."""
        import transformers as tf

        tok, common = cls._tiny_common(num_layers)
        pins = [[56, 112], [112, 56], [112, 112]]
        improc = tf.LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                            image_grid_pinpoints=pins)
        proc = tf.LlavaNextProcessor(improc, tok, patch_size=14, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
        return tf.LlavaNextConfig(**common, image_grid_pinpoints=pins, image_seq_length=16), proc

    @classmethod
    def synthetic_image(cls, config: Any, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """AnyRes pixel views of an image of ``size`` (default: 2x2 views) and its token count: base view +
        unpadded crop grid with row newlines."""
        from transformers.models.llava_next.modeling_llava_next import (
            image_size_to_num_patches,
        )

        if config.vision_feature_select_strategy != "default":
            raise VTPruneError("synthetic LLaVA-NeXT inputs need vision_feature_select_strategy='default'")
        vc = config.vision_config
        size = list(size or (2 * vc.image_size, 2 * vc.image_size))
        views = image_size_to_num_patches(size, config.image_grid_pinpoints, vc.image_size)
        pixels = torch.randn(1, views, vc.num_channels, vc.image_size, vc.image_size, generator=generator)
        return SyntheticImage(pixels, torch.full((cls.anyres_tokens(config, size),), config.image_token_id),
                              {"image_sizes": torch.tensor([size])})
