"""InternVL (``InternVLForConditionalGeneration``, InternVL3 / InternVL3.5 "-hf" checkpoints): tiles + thumbnail,
pixel shuffle, one run of ``<IMG_CONTEXT>`` per image, a Qwen2 decoder with 1-D positions.

What the adapter gathers (docs/families/internvl.md has the details):

* **Images.** The processor writes ``<img>`` + ``<IMG_CONTEXT>`` × (tokens per view · views) + ``</img>`` for each
  image. The model's ``pooler_output`` is per *tile*, not per image, so an image is one contiguous run of
  placeholders (``<img>``/``</img>`` separate adjacent images) and never a count read off the features.
* **Layout.** Every view (each tile, then the thumbnail when there is more than one tile) is its own ``g × g``
  grid segment (``g`` = patch grid · ``downsample_ratio``; 16 for 448-px tiles); the number of views is the run
  length / g². The tile arrangement is not in the model inputs; :meth:`InternVLAdapter.tile_grid` recomputes it
  from an image size as the image processor does (``get_optimal_tiled_canvas``).
* **Pixel shuffle.** Token (i, j) of a view concatenates patches (s·i + a, s·j + b), a, b < s = 1 / ratio
  (channel blocks in that row-major order): patch (r, c) feeds token ``(r // s)·g + c // s``.
* **Vision attention.** InternViT has a [CLS] token (position 0, dropped after the encoder), absolute positions,
  ``q_proj``/``k_proj`` with optional ``q_norm``/``k_norm`` over the full width: q/k are recomputed per view with
  [CLS] kept, so [CLS]-reading methods run on the real [CLS] row (no fallback).
* **Projector.** ``LayerNorm(s²·C) → linear_1 → GELU → linear_2`` on the shuffled features; the projector inputs
  are the s² patch features each token concatenates ([V, s², C], the pixel shuffle's channel-block order), and
  re-projecting them is exactly the model's visual input. The LayerNorm over all s²·C values makes the first stage
  non-linear; the :class:`~vtprune.capture.MLPProjector` offered names it, and ZOO-Prune's structured estimator
  handles it (one scale per token and direction, from dot products).

Video frames use the same ``<IMG_CONTEXT>`` id (``Frame{i}: <img>…</img>``): each frame is a one-view image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..capture import InputCapture, MLPProjector, ProjectorInput, VisionQK, per_vector_norm
from ..errors import VTPruneError
from ..view import ImageLayout, Segment
from .base import LmmsWrapper, ModelAdapter, SyntheticImage, VisionWork, tiny_text_config, tiny_tokenizer
from .llava import LlavaAdapter

#: the tiny InternVL models' chat template (``<|im_start|>`` turns, one ``<IMG_CONTEXT>`` per image, which the
#: processor expands to ``<img>`` + the image's context tokens + ``</img>``)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def _pair(x: Any) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


class InternVLAdapter(ModelAdapter):
    """InternVL: an image is one run of context tokens made of views (tiles, then the thumbnail), each a
    pixel-shuffled ``g × g`` grid."""

    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    bench_configs = ("internvl3-8b",)
    tiny_eos = "<|im_end|>"
    lmms = LmmsWrapper("vtprune_internvl_hf", simple=None, chat="lmms_eval.models.chat.internvl_hf.InternVLHf",
                       takes=("attn_implementation",))

    # ---- geometry (a config suffices) -----------------------------------------------------------------
    @staticmethod
    def shuffle(config: Any) -> int:
        """Patches per side merged into one token by the pixel shuffle (2 for ``downsample_ratio`` 0.5)."""
        s = round(1 / config.downsample_ratio)
        if abs(s * config.downsample_ratio - 1) > 1e-6:
            raise VTPruneError(f"downsample_ratio={config.downsample_ratio} is not 1/s for an integer s")
        return s

    @classmethod
    def patch_grid(cls, config: Any) -> tuple[int, int]:
        """(rows, cols) of a view's patch grid."""
        (h, w), (ph, pw) = _pair(config.vision_config.image_size), _pair(config.vision_config.patch_size)
        return h // ph, w // pw

    @classmethod
    def token_grid(cls, config: Any) -> tuple[int, int]:
        """(rows, cols) of a view's visual tokens after the pixel shuffle."""
        s = cls.shuffle(config)
        rows, cols = cls.patch_grid(config)
        if rows % s or cols % s:
            raise VTPruneError(f"a {rows}x{cols} patch grid cannot be pixel-shuffled by {s}")
        return rows // s, cols // s

    @classmethod
    def tokens_per_view(cls, config: Any) -> int:
        rows, cols = cls.token_grid(config)
        return rows * cols

    @classmethod
    def patch_tokens(cls, config: Any) -> torch.Tensor:
        """[P] the view-local token each patch (raster order, [CLS] excluded) feeds after the pixel shuffle."""
        s = cls.shuffle(config)
        rows, cols = cls.patch_grid(config)
        r, c = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
        return ((r // s) * (cols // s) + c // s).flatten()

    @staticmethod
    def tile_grid(size: tuple[int, int], tile: tuple[int, int], min_tiles: int = 1, max_tiles: int = 12
                  ) -> tuple[int, int]:
        """(rows, cols) of tiles an image of ``size`` (H, W) is cut into, as ``GotOcr2ImageProcessor`` does
        (``get_optimal_tiled_canvas``: the arrangement of ``min_tiles..max_tiles`` tiles closest in aspect ratio)."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        cols, rows = get_optimal_tiled_canvas(tuple(size), tuple(tile), min_tiles, max_tiles)
        return rows, cols

    @classmethod
    def views_of(cls, size: tuple[int, int], tile: tuple[int, int], min_tiles: int = 1, max_tiles: int = 12) -> int:
        """Encoder views of an image of ``size``: its tiles, plus one thumbnail when there is more than one tile."""
        rows, cols = cls.tile_grid(size, tile, min_tiles, max_tiles)
        return rows * cols + (rows * cols > 1)

    # ---- images and layout --------------------------------------------------------------------------------
    def image_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        """Unknown from the features: ``pooler_output`` is one entry per tile (a 5-view image would count as 5
        images). ``None`` makes :meth:`locate_images` take one image per contiguous run of placeholders, which
        ``<img>``/``</img>`` delimit."""
        return None

    def layout(self, features: torch.Tensor, positions: torch.Tensor) -> ImageLayout:
        n = features.shape[0]
        rows, cols = self.token_grid(self.model.config)
        views, rest = divmod(n, rows * cols)
        if rest or views == 0:
            return ImageLayout.flat(n)
        return ImageLayout((Segment(rows, cols),) * views)

    def _token_maps(self, n_views: int, layouts: list[ImageLayout], device: torch.device
                    ) -> list[list[tuple[int, torch.Tensor]]]:
        """Per image: (encoder view index, image-local token index of each of the view's patches), views in
        encoder order (an image's tiles, then its thumbnail; images in prompt order)."""
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "default":
            raise VTPruneError("InternVL vision-encoder and projector signals need vision_feature_select_strategy="
                               "'default' (the model drops [CLS] before the pixel shuffle)")
        per_view = self.tokens_per_view(cfg)
        local = self.patch_tokens(cfg).to(device)
        out, view = [], 0
        for layout in layouts:
            if layout.size % per_view:
                raise VTPruneError(f"an image of {layout.size} visual tokens is not a whole number of "
                                   f"{per_view}-token views")
            maps = [(view + j, local + j * per_view) for j in range(layout.size // per_view)]
            view += len(maps)
            out.append(maps)
        if view != n_views:
            raise VTPruneError(f"the vision tower encoded {n_views} views but the images' layouts account for {view}")
        return out

    # ---- vision attention ([CLS] first, absolute positions, optional q/k norms) ----------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.backbone.vision_tower

    @property
    def num_vision_layers(self) -> int:
        return len(self.backbone.vision_tower.encoder.layer)

    def vision_attention(self, layer: int) -> nn.Module:
        return self.backbone.vision_tower.encoder.layer[layer].attention

    def vision_qk(self, layer: int, capture: InputCapture, tower: InputCapture,
                  layouts: list[ImageLayout]) -> list[list[VisionQK]]:
        attn = self.vision_attention(layer)
        hidden = capture.tensor("hidden_states", call=0)  # [views, 1 + P, C], layernorm_before applied
        v, n, _ = hidden.shape
        q = attn.q_norm(attn.q_proj(hidden)).view(v, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(hidden)).view(v, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        scaling = float(attn.scale)
        return [[VisionQK(query=q[i, :, 1:], key=k[i, :, 1:], scaling=scaling, token_of_patch=t,
                          cls_query=q[i, :, 0], cls_key=k[i, :, 0]) for i, t in maps]
                for maps in self._token_maps(v, layouts, q.device)]

    # ---- projector (LayerNorm -> linear -> GELU -> linear on the shuffled features) --------------------------
    @property
    def projector(self) -> nn.Module:
        return self.backbone.multi_modal_projector

    def projector_inputs(self, capture: InputCapture, tower: InputCapture, layouts: list[ImageLayout]
                         ) -> list[ProjectorInput]:
        x = capture.tensor("image_features", call=0)  # [views, tokens per view, s²·C], after the pixel shuffle
        g = self.shuffle(self.model.config) ** 2
        out = []
        for layout, maps in zip(layouts, self._token_maps(x.shape[0], layouts, x.device)):
            inputs = torch.cat([x[i] for i, _ in maps])  # an image's views are consecutive: tokens in order
            inputs = inputs.view(layout.size, g, -1)  # the s² patch features of each token, in channel-block order
            valid = torch.ones(layout.size, dtype=torch.bool, device=x.device)
            out.append(ProjectorInput(inputs=inputs, valid=valid, project=self._project, mlp=self._mlp()))
        return out

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x.reshape(x.shape[0], -1))

    def _mlp(self) -> MLPProjector | None:
        """The projector as LayerNorm (over a token's 4 pixel-shuffled patch features at once) -> Linear -> act ->
        Linear, for the structured ZO estimator; ``None`` for a projector of another shape."""
        p = self.projector
        if not per_vector_norm(getattr(p, "layer_norm", None)) \
                or not all(hasattr(p, n) for n in ("linear_1", "act", "linear_2")):
            return None
        return MLPProjector(first=p.linear_1, act=p.act, last=p.linear_2, norm=p.layer_norm)

    # ---- family level: FLOPs, tiny model, benchmark image -----------------------------------------------
    @classmethod
    def vision_work(cls, config: Any, inputs: Mapping[str, Any]) -> VisionWork:
        """Every view the tower encodes (tiles and thumbnails of all images, video frames): one per
        ``pixel_values`` entry, as for LLaVA."""
        return LlavaAdapter.vision_work(config, inputs)

    @classmethod
    def vision_flops(cls, config: Any, work: VisionWork) -> dict[str, int]:
        """InternViT (patch convolution; every layer on [CLS] + patches: q/k/v/out projections, FFN, attention)
        and the projector's two linear layers on the shuffled tokens; norms and the shuffle itself cost no
        counted FLOPs."""
        vc = config.vision_config
        rows, cols = cls.patch_grid(config)
        ph, pw = _pair(vc.patch_size)
        patches, c = rows * cols, vc.hidden_size
        s = patches + 1  # [CLS]
        conv = 2 * patches * c * vc.num_channels * ph * pw
        layer = 2 * s * (4 * c * c + 2 * c * vc.intermediate_size) + 4 * s * s * c
        d, shuffled = config.text_config.hidden_size, c * cls.shuffle(config) ** 2
        proj = 2 * cls.tokens_per_view(config) * (shuffled * d + d * d)
        return {"vision": work.views * (conv + vc.num_hidden_layers * layer), "projector": work.views * proj}

    @classmethod
    def tiny_parts(cls, num_layers: int) -> tuple[Any, Any]:
        """A 2-layer InternViT on 56-px tiles with 14-px patches (4x4 patches -> 2x2 tokens per view; q/k norms
        on, so they are exercised), up to 6 tiles + thumbnail, and a Qwen2 decoder."""
        import transformers as tf

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
        tok = tiny_tokenizer(specials, CHAT_TEMPLATE)
        # named special tokens the processor reads (saved with the tokenizer, as in released checkpoints)
        tok._set_model_specific_special_tokens({"start_image_token": "<img>", "end_image_token": "</img>",
                                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=56, patch_size=14, use_qk_norm=True, attention_bias=True)
        text = dict(model_type="qwen2", **tiny_text_config(len(tok), num_hidden_layers=num_layers))
        config = tf.InternVLConfig(vision_config=vision, text_config=text, image_seq_length=4,
                                   image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), pad_token_id=0)
        size = {"height": 56, "width": 56}
        proc = tf.InternVLProcessor(tf.GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=6), tok,
                                    tf.InternVLVideoProcessor(size=size), image_seq_length=4,
                                    chat_template=CHAT_TEMPLATE)
        return config, proc

    @classmethod
    def tiny_weights(cls, model: nn.Module) -> None:
        """InternViT initialises its [CLS] token and absolute position embeddings to zero: draw them, so that the
        tiny tower's [CLS] query and positions are not degenerate (a zero [CLS] attends uniformly)."""
        emb = model.model.vision_tower.embeddings
        with torch.no_grad():
            for p in (emb.cls_token, emb.position_embeddings):
                if p is not None:
                    p.normal_(std=1.0)

    @classmethod
    def synthetic_image(cls, config: Any, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """The tiles (+ thumbnail) of an image of ``size`` (H, W; default 2x2 tiles, i.e. 5 views) as the image
        processor cuts it (1..12 tiles), and its context tokens. The ``<img>``/``</img>`` ids are not in the
        config, so the synthetic prompt carries the context tokens only (one image: nothing to delimit)."""
        vc = config.vision_config
        tile = _pair(vc.image_size)
        size = tuple(size or (2 * tile[0], 2 * tile[1]))
        views = cls.views_of(size, tile)
        pixels = torch.randn(views, vc.num_channels, *tile, generator=generator)
        return SyntheticImage(pixels, torch.full((views * cls.tokens_per_view(config),), config.image_token_id), {})
