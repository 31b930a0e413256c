"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, images and videos): a SigLIP tower without [CLS], LLaVA's MLP
projector on AnyRes views, anyres-max grids with unpadding, bilinear down-resizing and row newlines; a Qwen2
decoder with 1-D positions.

What the adapter gathers (docs/families/llava_onevision.md has the details):

* **Tokens of an image** (the model's ``pack_image_features``): the base view's ``g × g`` grid, then the crop
  grid — AnyRes crops stitched into one canvas, ``unpad_image``-d, and, when ``r = sqrt(h·w / (N·g²)) > 1.1``
  for ``vision_aspect_ratio="anyres_max_N"``, bilinearly resized to ``(int(h / r), int(w / r))`` — with one
  ``image_newline`` token ending each row. An image of a prompt holding several images is encoded as its base
  view only and gets ``g² + 1`` tokens (one trailing newline): ``batch_num_images`` decides, as in the model.
* **Layout**: read off the features (newline tokens equal ``image_newline``), as for LLaVA-NeXT: segments
  ``(g × g)`` and ``(rows × cols, newline)``; a base-only image is ``(g × g), (1 × 0, newline)``.
* **Geometry** (which patch becomes which token) comes from the images' sizes through the model's own
  functions (``get_anyres_image_grid_shape``, ``unpad_image`` applied to a canvas of patch indices), never from
  the layout: a crop grid cannot be told from an unpadded, resized token grid. ``forward`` passes the sizes to
  the backbone; ``generate`` encodes images before its first forward, so the adapter reads them from the
  ``generate`` call (:meth:`ModelAdapter.observe_generate`).
* **Resized grids** mix crop patches: each resized token is a bilinear blend of up to four patches' projected
  features. The adapter maps a resized token to its **nearest source**, the patch with the largest bilinear
  weight (computed by running the same ``interpolate`` on an index basis; the first on ties): that patch's
  vision q/k score the token and its pre-projector feature is the token's projector input; the other patches of
  a resized grid feed no token (``token_of_patch = -1``, like patches that unpadding drops). Every token is thus
  fed by exactly one patch, so resized and unresized tokens' attention scores stay comparable. Re-projecting
  a resized token's projector input gives its nearest source's embedding, not the blend (VisionZip /
  VisPruner / ZOO-Prune read it as such); base-view and unresized tokens re-project exactly.
* **No [CLS]**: ``vision_cls = False``; [CLS]-reading methods use the received-attention fallback
  (``vtprune.ops.cls_or_received``) on the last encoder layer, whose output (``hidden_states[-1]``, before
  ``post_layernorm``) is what the projector reads.

* **Videos** (``<video>``): each frame is a base view, projected and bilinearly pooled to ``ceil(g/2)²`` tokens;
  the frames follow each other and one ``image_newline`` token ends the video. A video is one item laid out as
  one pooled grid per frame plus that newline, outside every frame. Vision-encoder and projector signals are not
  mapped to pooled video tokens: methods reading them refuse a video by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..capture import InputCapture, ProjectorInput, VisionQK
from ..errors import VTPruneError
from ..view import ImageLayout, Segment
from .base import (
    ImageSpans,
    ModelAdapter,
    SyntheticImage,
    VisionWork,
    tiny_text_config,
    tiny_tokenizer,
)
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter

#: the tiny OneVision models' chat template (``<|im_start|>`` turns, one ``<image>`` per image, one ``<video>``
#: per video)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
    "{% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


@dataclass(frozen=True)
class AnyresGeometry:
    """Where one image's patches go. ``views``: encoder views (1 = base only, else 1 + crops); ``grid``: the crop
    grid (views down, across), ``(0, 0)`` for a base-only image; ``canvas`` [rows, cols]: for each token of the
    packed crop grid (newlines aside), the flat index of its source patch on the ``grid[0]·g × grid[1]·g`` crop
    canvas (after unpadding; for a resized grid, the nearest bilinear source); ``resized``: whether anyres-max
    resized the grid; ``g``: the base view's side in patches."""

    views: int
    grid: tuple[int, int]
    canvas: torch.Tensor | None
    resized: bool
    g: int

    @property
    def tokens(self) -> int:
        if self.canvas is None:
            return self.g * self.g + 1
        rows, cols = self.canvas.shape
        return self.g * self.g + rows * (cols + 1)

    def token_of_patch(self, device: torch.device) -> list[torch.Tensor]:
        """Per encoder view (base first, then crops in raster order): the token index [g²] of each patch, -1
        where unpadding or the resize leaves a patch without a token of its own."""
        g = self.g
        maps = [torch.arange(g * g, device=device)]
        if self.canvas is None:
            return maps
        nph, npw = self.grid
        rows, cols = self.canvas.shape
        token = torch.full((nph * g * npw * g,), -1, dtype=torch.long)
        r, c = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
        token[self.canvas.flatten()] = (g * g + r * (cols + 1) + c).flatten()
        token = token.view(nph, g, npw, g).permute(0, 2, 1, 3).reshape(nph * npw, g * g)
        return maps + list(token.to(device).unbind(0))


def nearest_sources(n_in: int, n_out: int) -> torch.Tensor:
    """For each of ``n_out`` outputs of a 1-D bilinear resize of ``n_in`` inputs (``align_corners=False``, as
    ``pack_image_features``): the input with the largest weight (the first on ties), read off the resize itself."""
    basis = torch.eye(n_in, dtype=torch.float64)[None, :, :, None]  # channels = inputs, height = positions
    weights = nn.functional.interpolate(basis, [n_out, 1], mode="bilinear")[0, :, :, 0]  # [n_in, n_out]
    return weights.argmax(0)


def anyres_geometry(config: Any, size: list[int] | tuple[int, int], patched: bool = True) -> AnyresGeometry:
    """The geometry of one image of ``size`` (H, W) as ``LlavaOnevisionModel`` packs it; ``patched=False`` for an
    image of a multi-image prompt (base view only)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    vc = config.vision_config
    g = vc.image_size // vc.patch_size
    if not patched:
        return AnyresGeometry(1, (0, 0), None, False, g)
    nph, npw = get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, vc.image_size)
    canvas = unpad_image(torch.arange(nph * g * npw * g).view(1, nph * g, npw * g), torch.tensor(list(size)))[0]
    h, w = canvas.shape
    max_views = int(config.vision_aspect_ratio.strip("anyres_max_"))  # noqa: B005 -- as the model parses it
    ratio = math.sqrt(h * w / (max_views * g ** 2))
    resized = ratio > 1.1
    if resized:
        canvas = canvas[nearest_sources(h, int(h // ratio))][:, nearest_sources(w, int(w // ratio))]
    return AnyresGeometry(1 + nph * npw, (nph, npw), canvas, resized, g)


def pooled_side(config: Any) -> int:
    """Side of a video frame's pooled token grid (``apply_pooling``: half the patch grid, rounded up)."""
    vc = config.vision_config
    return math.ceil(vc.image_size // vc.patch_size / 2)


def image_geometries(config: Any, inputs: Mapping[str, Any]) -> list[AnyresGeometry] | None:
    """Geometry of every image of a call's (or a ``generate`` call's) keyword inputs, ``None`` without
    ``image_sizes``. ``batch_num_images`` decides which images are base-only, exactly as the model does (absent:
    every image gets its AnyRes views)."""
    sizes = inputs.get("image_sizes")
    if sizes is None or inputs.get("pixel_values") is None:
        return None
    sizes = torch.as_tensor(sizes).tolist()
    per_sample = inputs.get("batch_num_images")
    if per_sample is None:
        patched = [True] * len(sizes)
    else:
        patched = [int(n) == 1 for n in torch.as_tensor(per_sample).tolist() for _ in range(int(n))]
    if len(patched) != len(sizes):
        raise VTPruneError(f"batch_num_images accounts for {len(patched)} images but image_sizes holds {len(sizes)}")
    return [anyres_geometry(config, s, p) for s, p in zip(sizes, patched)]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision images. Reuses LLaVA-NeXT's newline-based layout and LLaVA's projector capture; the
    geometry (views, unpadding, anyres-max resize, base-only multi-image views) is its own, from image sizes."""

    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    bench_configs = ("llava-onevision-7b",)
    tiny_eos = "<|im_end|>"
    vision_cls = False
    lmms = LlavaAdapter.lmms  # lmms-eval's llava_hf classes load LlavaOnevisionForConditionalGeneration too
    prunes_video = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._geometries: list[AnyresGeometry] | None = None  # the images of the call in flight
        self._generate_geometries: list[AnyresGeometry] | None = None  # the images of the last generate call

    # ---- locating images ---------------------------------------------------------------------------
    def observe_generate(self, kwargs: dict[str, Any]) -> None:
        self._generate_geometries = image_geometries(self.model.config, kwargs)

    def locate_images(self, inputs: dict[str, Any]) -> ImageSpans | None:
        geoms = image_geometries(self.model.config, inputs)
        if geoms is None and inputs.get("mm_encoder_outputs"):
            geoms = self._generate_geometries
        self._geometries = geoms
        return ModelAdapter.locate_images(self, inputs)

    def image_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        counts = ModelAdapter.image_counts(self, inputs)
        if counts is not None:
            return counts
        geoms = image_geometries(self.model.config, inputs)
        return None if geoms is None else [geo.tokens for geo in geoms]

    def video_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        """Per video: its frames' pooled grids and one trailing newline, from ``pixel_values_videos`` [videos,
        frames, C, H, W]."""
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("video")
        if encoded is not None:  # ``generate`` encoded them up front: [videos, tokens, D]
            return [int(encoded.pooler_output.shape[1])] * int(encoded.pooler_output.shape[0])
        videos = inputs.get("pixel_values_videos")
        if videos is None:
            return None
        side = pooled_side(self.model.config)
        return [int(videos.shape[1]) * side * side + 1] * int(videos.shape[0])

    def video_layout(self, features: torch.Tensor, positions: torch.Tensor) -> ImageLayout:
        side, n = pooled_side(self.model.config), features.shape[0]
        frames, extra = divmod(n - 1, side * side)
        if extra or frames < 1:
            raise VTPruneError(f"a video's {n} tokens are not whole {side}x{side} pooled frames plus a newline")
        return ImageLayout((Segment(side, side),) * frames + (Segment(1, 0, newline=True),),
                           tuple(range(frames)) + (-1,))

    # ---- vision attention (SigLIP: no [CLS]) and projector -------------------------------------------
    def _view(self, q: torch.Tensor, k: torch.Tensor, scaling: float, token_of_patch: torch.Tensor) -> VisionQK:
        return VisionQK(query=q, key=k, scaling=scaling, token_of_patch=token_of_patch)

    def _token_maps(self, n_views: int, layouts: list[ImageLayout], device: torch.device
                    ) -> list[list[tuple[int, torch.Tensor]]]:
        """Per image: (encoder view, token index of each of its patches) for the base view and every crop."""
        if self.model.config.vision_feature_select_strategy != "full":
            raise VTPruneError("LLaVA-OneVision vision-encoder and projector signals need "
                               "vision_feature_select_strategy='full' (SigLIP has no [CLS] to drop)")
        if any(layout.is_video for layout in layouts):
            raise VTPruneError("LLaVA-OneVision vision-encoder and projector signals are not mapped to pooled video "
                               "tokens: prune videos with a method that reads neither")
        geoms = self._geometries
        if geoms is None or len(geoms) != len(layouts) or any(
                geo.tokens != layout.size for geo, layout in zip(geoms, layouts)):
            raise VTPruneError("LLaVA-OneVision vision-encoder and projector signals need the images' sizes: call the "
                               "model (or generate) with the processor's image_sizes and batch_num_images")
        out, view = [], 0
        for geo in geoms:
            maps = geo.token_of_patch(device)
            out.append([(view + v, t) for v, t in enumerate(maps)])
            view += len(maps)
        if view != n_views:
            raise VTPruneError(f"the vision tower encoded {n_views} views but the images' sizes account for {view}")
        return out

    def projector_inputs(self, capture: InputCapture, tower: InputCapture, layouts: list[ImageLayout]
                         ) -> list[ProjectorInput]:
        """LLaVA's per-token projector inputs under this family's patch -> token maps; a resized crop grid's
        tokens get their nearest source's input and are not ``exact``."""
        out = super().projector_inputs(capture, tower, layouts)
        for proj, geo in zip(out, self._geometries or ()):
            if geo.resized:
                proj.exact = proj.valid.clone()
                proj.exact[geo.g * geo.g:] = False
        return out

    # ---- family level: FLOPs, tiny model, benchmark image -----------------------------------------------
    @classmethod
    def vision_work(cls, config: Any, inputs: Mapping[str, Any]) -> VisionWork:
        """Every view the SigLIP tower encodes: each image's base view and (single-image prompts) its AnyRes crops,
        and every video frame."""
        geoms = image_geometries(config, inputs) or []
        videos = inputs.get("pixel_values_videos")
        frames = 0 if videos is None else int(videos.shape[0] * videos.shape[1])
        return VisionWork(views=sum(geo.views for geo in geoms) + frames)

    @classmethod
    def vision_flops(cls, config: Any, work: VisionWork) -> dict[str, int]:
        """SigLIP without head (patch convolution, every layer, no [CLS]) + the MLP projector, per view. The
        anyres-max bilinear resize is not a matrix product and is not counted (nor by ``FlopCounterMode``)."""
        vc = config.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        dv = vc.hidden_size
        conv = 2 * patches * dv * vc.num_channels * vc.patch_size ** 2
        layer = 2 * patches * (4 * dv * dv + 2 * dv * vc.intermediate_size) + 4 * patches * patches * dv
        feature_layers = config.vision_feature_layer
        n_feat = len(feature_layers) if isinstance(feature_layers, (list, tuple)) else 1
        tokens = patches - (config.vision_feature_select_strategy == "default")
        d = config.text_config.hidden_size
        proj = 2 * tokens * (dv * n_feat * d + d * d)
        return {"vision": work.views * (conv + vc.num_hidden_layers * layer), "projector": work.views * proj}

    @classmethod
    def tiny_parts(cls, num_layers: int) -> tuple[Any, Any]:
        """A 2-layer 56-px SigLIP (4x4 patches), AnyRes grids of 1x1 .. 2x2 views and ``anyres_max_2``, so that a
        2x2-view image (8x8 crop grid) is resized to 5x5 while 1x2 and 1x1 grids are not."""
        import transformers as tf

        tok = tiny_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], CHAT_TEMPLATE)
        tok.image_token, tok.video_token = "<image>", "<video>"
        pins = [[56, 56], [56, 112], [112, 56], [112, 112]]
        siglip = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56, "patch_size": 14,
                  "vision_use_head": False}
        text = dict(model_type="qwen2", **tiny_text_config(len(tok), num_hidden_layers=num_layers))
        config = tf.LlavaOnevisionConfig(
            text_config=text, vision_config=siglip, image_grid_pinpoints=pins, vision_aspect_ratio="anyres_max_2",
            image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
            vision_feature_select_strategy="full", vision_feature_layer=-1, pad_token_id=0)
        size = {"height": 56, "width": 56}
        proc = tf.LlavaOnevisionProcessor(
            tf.LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pins), tok,
            tf.LlavaOnevisionVideoProcessor(size=size), num_image_tokens=16, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_2", chat_template=CHAT_TEMPLATE)
        return config, proc

    @classmethod
    def synthetic_video(cls, config: Any, frames: int, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """``frames`` base views (every frame is encoded at the tower's own size; ``size`` is ignored): each frame's
        pooled grid, then one newline."""
        vc = config.vision_config
        if frames < 1:
            raise VTPruneError(f"a video of {frames} frames: give at least one")
        side = pooled_side(config)
        pixels = torch.randn(1, frames, vc.num_channels, vc.image_size, vc.image_size, generator=generator)
        return SyntheticImage(pixels, torch.full((frames * side * side + 1,), config.video_token_id), {})

    @classmethod
    def synthetic_image(cls, config: Any, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """AnyRes pixel views of one image of ``size`` (default: 2x2 views) and its token count (base view +
        unpadded, possibly resized crop grid with row newlines)."""
        vc = config.vision_config
        size = list(size or (2 * vc.image_size, 2 * vc.image_size))
        geo = anyres_geometry(config, size)
        pixels = torch.randn(1, geo.views, vc.num_channels, vc.image_size, vc.image_size, generator=generator)
        return SyntheticImage(pixels, torch.full((geo.tokens,), config.image_token_id),
                              {"image_sizes": torch.tensor([size])})
