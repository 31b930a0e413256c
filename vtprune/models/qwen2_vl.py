"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): images are (t, h, w) patch grids merged 2x2; positions are
M-RoPE triples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..capture import InputCapture, MLPProjector, ProjectorInput, VisionQK, per_vector_norm, rotate
from ..errors import VTPruneError
from ..view import ImageLayout, Segment
from .base import LmmsWrapper, ModelAdapter, SyntheticImage, VisionWork, tiny_text_config, tiny_tokenizer

#: the tiny Qwen models' chat template (``<|im_start|>`` turns, one ``<|image_pad|>`` per image, one
#: ``<|video_pad|>`` per video)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> "
    "{% elif c['type'] == 'video' %}<|vision_start|> <|video_pad|> <|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def _extents(rows: torch.Tensor) -> list[int]:
    """``max - min + 1`` of each row of position ids [A, n], read to the host at once (one read, not one per row)."""
    low, high = torch.aminmax(rows, dim=-1)
    return [e + 1 for e in (high - low).tolist()]


class Qwen2VLAdapter(ModelAdapter):
    """Layouts are read off the M-RoPE (t, h, w) position ids of each image's tokens, which the model
    computed from ``image_grid_thw`` on the full sequence. Each video is one item, laid out as one grid per
    temporal group of ``video_grid_thw`` (a group covers ``temporal_patch_size`` input frames)."""

    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    position_axes = 3
    vision_cls = False
    tiny_eos = "<|im_end|>"
    lmms = LmmsWrapper("vtprune_qwen2_vl", simple="lmms_eval.models.simple.qwen2_vl.Qwen2_VL", chat=None)
    prunes_video = True

    def image_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        return super().image_counts(inputs) or self._grid_counts(inputs.get("image_grid_thw"))

    def video_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        return super().video_counts(inputs) or self._grid_counts(inputs.get("video_grid_thw"))

    def _grid_counts(self, thw: Any) -> list[int] | None:
        """Merged tokens per ``(t, h, w)`` patch grid."""
        if thw is None:
            return None
        m = self.model.config.vision_config.spatial_merge_size
        return [t * (h // m) * (w // m) for t, h, w in torch.as_tensor(thw).tolist()]

    def layout(self, features: torch.Tensor, positions: torch.Tensor) -> ImageLayout:
        n = features.shape[0]
        if positions.shape[0] < 3:
            return ImageLayout.flat(n)
        t, h, w = _extents(positions[-3:])
        if t * h * w != n:
            return ImageLayout.flat(n)
        return ImageLayout((Segment(h, w),) * t)

    def video_layout(self, features: torch.Tensor, positions: torch.Tensor) -> ImageLayout:
        """One ``h x w`` grid per temporal group, read off the (h, w) position rows; the temporal row is scaled by
        the frame rate (Qwen2.5-VL's ``second_per_grid_ts``), so the groups are counted as ``n / (h w)``."""
        n = features.shape[0]
        h, w = _extents(positions[-2:])
        if positions.shape[0] < 3 or n % (h * w):
            raise VTPruneError(f"a video's {n} tokens do not tile its {h}x{w} position grid into whole frames")
        return ImageLayout.video(Segment(h, w), n // (h * w))

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

    def _token_maps(self, tower: InputCapture, layouts: list[ImageLayout]) -> list[tuple[int, slice, torch.Tensor]]:
        """Per item (image or video): the encoder pass holding it (the model encodes a call's images, then its
        videos), its slice of that pass's packed patch sequence and the item-local token index of each patch."""
        out: list[tuple[int, slice, torch.Tensor] | None] = [None] * len(layouts)
        m2 = self.model.config.vision_config.spatial_merge_size ** 2
        call = 0
        for video in (False, True):
            items = [i for i, layout in enumerate(layouts) if layout.is_video == video]
            if not items:
                continue
            kind = "video" if video else "image"
            if call >= len(tower.calls):
                raise VTPruneError(f"no vision-encoder pass was seen for the prompt's {kind}s")
            grid_thw = tower.tensor("grid_thw", 1, call=call)
            sizes = grid_thw.prod(-1).tolist()
            if len(sizes) != len(items):
                raise VTPruneError(f"the vision tower encoded {len(sizes)} {kind}s but the prompt holds {len(items)}")
            token = self._patch_order(grid_thw)
            start, first_token = 0, 0
            for i, size in zip(items, sizes):
                out[i] = (call, slice(start, start + size), token[start:start + size] - first_token)
                start, first_token = start + size, first_token + size // m2
            call += 1
        return out  # type: ignore[return-value]

    def vision_qk(self, layer: int, capture: InputCapture, tower: InputCapture,
                  layouts: list[ImageLayout]) -> list[list[VisionQK]]:
        """One encoder view per temporal group: the ViT attends within each group of a video (its full-attention
        blocks run per frame group, its windows inside one), so a video's groups are scored as separate views."""
        attn = self.vision_attention(layer)
        passes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for (call, sl, token), layout in zip(self._token_maps(tower, layouts), layouts):
            if call not in passes:
                hidden = capture.tensor("hidden_states", call=call)
                cos, sin = capture.tensor("position_embeddings", 2, call=call)
                n = hidden.shape[0]
                if tower.tensor("grid_thw", 1, call=call).prod(-1).sum() != n:
                    raise VTPruneError("captured vision attention inputs do not match the images' grid_thw")
                qkv = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 2, 0, 3)  # [3, H, n, hd]
                cos, sin = cos.unsqueeze(0).float(), sin.unsqueeze(0).float()
                passes[call] = tuple(rotate(t.float(), cos, sin).to(hidden.dtype) for t in (qkv[0], qkv[1]))
            q, k = passes[call]
            out.append([VisionQK(query=q[:, sl][:, part], key=k[:, sl][:, part], scaling=float(attn.scaling),
                                 token_of_patch=token[part])
                        for part in _group_slices(sl.stop - sl.start, layout.num_frames)])
        return out

    # ---- projector (the 2x2 PatchMerger) ----------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        return self.backbone.visual.merger

    def projector_inputs(self, capture: InputCapture, tower: InputCapture, layouts: list[ImageLayout]
                         ) -> list[ProjectorInput]:
        m2 = self.model.config.vision_config.spatial_merge_size ** 2
        out = []
        for (call, sl, token), layout in zip(self._token_maps(tower, layouts), layouts):
            x = capture.tensor("x", call=call)  # [patches, d_v] in encoder order
            order = torch.sort(token, stable=True).indices  # group each token's patches, encoder order kept
            inputs = x[sl][order].view(layout.size, m2, x.shape[-1])
            valid = torch.ones(layout.size, dtype=torch.bool, device=x.device)
            out.append(ProjectorInput(inputs=inputs, valid=valid, project=self._project, mlp=self._mlp()))
        return out

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x.reshape(-1, x.shape[-1]))

    def _mlp(self) -> MLPProjector | None:
        """The PatchMerger as norm-each-patch -> Linear -> GELU -> Linear (Qwen2-VL: LayerNorm, Qwen2.5-VL:
        RMSNorm), for the structured ZO estimator; ``None`` for a merger of another shape."""
        p = self.projector
        mlp = getattr(p, "mlp", None)
        if not (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and per_vector_norm(getattr(p, "ln_q", None))):
            return None
        return MLPProjector(first=mlp[0], act=mlp[1], last=mlp[2], norm=p.ln_q)

    # ---- family level: FLOPs, tiny model, benchmark image -----------------------------------------------
    @classmethod
    def vision_work(cls, config: Any, inputs: Mapping[str, Any]) -> VisionWork:
        """The ``(t, h, w)`` patch grid of every image and video."""
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if inputs.get(key) is not None
                 for g in torch.as_tensor(inputs[key]).tolist()]
        return VisionWork(grids=tuple(tuple(int(x) for x in g) for g in grids))

    @classmethod
    def _vit_dims(cls, vc: Any) -> tuple[int, int, int, set[int]]:
        """(ViT width, merger output width, FFN multiply-adds per token, full-attention blocks)."""
        return vc.embed_dim, vc.hidden_size, 2 * vc.embed_dim * int(vc.embed_dim * vc.mlp_ratio), set(range(vc.depth))

    @classmethod
    def _window_attention(cls, vc: Any, e: int, t: int, h: int, w: int, full_blocks: set[int]) -> int:
        """Attention FLOPs of the windowed blocks for one grid (Qwen2-VL has none)."""
        return 0

    @classmethod
    def vision_flops(cls, config: Any, work: VisionWork) -> dict[str, int]:
        """ViT (patch embedding, every block, per-frame full attention, windows) + PatchMerger for ``work.grids``."""
        vc = config.vision_config
        e, out_dim, mlp, full_blocks = cls._vit_dims(vc)
        m = vc.spatial_merge_size
        patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        vision = projector = 0
        for t, h, w in work.grids:
            n = t * h * w
            frame_sq = t * (h * w) ** 2  # full attention runs per frame
            vision += 2 * n * e * patch_in + vc.depth * 2 * n * (4 * e * e + mlp)
            vision += 4 * e * frame_sq * len(full_blocks)
            vision += cls._window_attention(vc, e, t, h, w, full_blocks)
            ctx = e * m * m
            projector += 2 * (n // (m * m)) * (ctx * ctx + ctx * out_dim)
        return {"vision": vision, "projector": projector}

    @classmethod
    def _tiny_common(cls, num_layers: int) -> tuple[Any, Any, Any, dict[str, Any]]:
        """(tokenizer, image processor, video processor, config keyword arguments) shared by the tiny Qwen
        families: 14-px patches merged 2x2, images of 56² to 112² px, an M-RoPE decoder."""
        import transformers as tf

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]
        tok = tiny_tokenizer(specials, CHAT_TEMPLATE)
        tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"
        tok.vision_start_token, tok.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        head_dim = 64 // 4
        text = tiny_text_config(len(tok), num_hidden_layers=num_layers,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3]})
        assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
        improc = tf.Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                          size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
        # the per-frame pixel cap pinned off, as transformers' current default (it warns on every call otherwise)
        video = tf.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, cap_pixels_per_frame=False,
                                         size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
        return tok, improc, video, dict(text_config=text, **ids)

    @classmethod
    def tiny_parts(cls, num_layers: int) -> tuple[Any, Any]:
        import transformers as tf

        tok, improc, video, common = cls._tiny_common(num_layers)
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=2)
        proc = tf.Qwen2VLProcessor(improc, tok, video, chat_template=CHAT_TEMPLATE)
        return tf.Qwen2VLConfig(vision_config=vision, **common), proc

    @classmethod
    def synthetic_image(cls, config: Any, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """Flattened patches of one image of ``size`` (a multiple of patch × merge; default 672 x 672 = 576
        visual tokens), between its vision start and end tokens."""
        vc = config.vision_config
        h, w = cls._patch_grid(config, size or (672, 672))
        pixels = torch.randn(h * w, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, generator=generator)
        n_visual = h * w // vc.spatial_merge_size ** 2
        placeholders = torch.cat([torch.tensor([config.vision_start_token_id]),
                                  torch.full((n_visual,), config.image_token_id),
                                  torch.tensor([config.vision_end_token_id])])
        return SyntheticImage(pixels, placeholders, {"image_grid_thw": torch.tensor([[1, h, w]])})

    @classmethod
    def synthetic_video(cls, config: Any, frames: int, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """Flattened patches of ``frames`` frames of ``size`` (default 448 x 448: 256 visual tokens per temporal group
        of ``temporal_patch_size`` frames), with the frame-span placeholders of :meth:`_video_placeholders`."""
        vc = config.vision_config
        h, w = cls._patch_grid(config, size or (448, 448))
        if frames < 1 or frames % vc.temporal_patch_size:
            raise VTPruneError(f"a video of {frames} frames: Qwen encodes frames in groups of "
                               f"{vc.temporal_patch_size}, so give a positive multiple of it")
        t = frames // vc.temporal_patch_size
        pixels = torch.randn(t * h * w, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                             generator=generator)
        return SyntheticImage(pixels, cls._video_placeholders(config, t, h * w // vc.spatial_merge_size ** 2),
                              {"video_grid_thw": torch.tensor([[t, h, w]]), **cls._video_timing(config, t)})

    @classmethod
    def _patch_grid(cls, config: Any, size: tuple[int, int]) -> tuple[int, int]:
        """The (rows, cols) patch grid of an image or frame of ``size``, which must be a multiple of patch × merge."""
        vc = config.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        if size[0] % unit or size[1] % unit:
            raise VTPruneError(f"image size {size[0]}x{size[1]} must be a multiple of {unit} (patch × merge) for Qwen")
        return size[0] // vc.patch_size, size[1] // vc.patch_size

    @classmethod
    def _video_placeholders(cls, config: Any, groups: int, per_group: int) -> torch.Tensor:
        """A video's placeholder ids: one span of every group's tokens between vision start and end."""
        return torch.cat([torch.tensor([config.vision_start_token_id]),
                          torch.full((groups * per_group,), config.video_token_id),
                          torch.tensor([config.vision_end_token_id])])

    @classmethod
    def _video_timing(cls, config: Any, groups: int) -> dict[str, torch.Tensor]:
        """Inputs that time a synthetic video's ``groups`` temporal groups (none for Qwen2-VL)."""
        return {}

    @classmethod
    def prompt_inputs(cls, config: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``mm_token_type_ids``: 1 on image placeholders, 2 on video ones (the model's M-RoPE index reads it)."""
        types = (input_ids == config.image_token_id).long()
        if getattr(config, "video_token_id", None) is not None:
            types += 2 * (input_ids == config.video_token_id).long()
        return {"mm_token_type_ids": types}


def _group_slices(patches: int, groups: int) -> list[slice]:
    """The encoder's patches of each temporal group of an item of ``patches`` patches: consecutive equal slices (the
    packed sequence runs group by group; Qwen2.5-VL's window order stays inside a group)."""
    size = patches // groups
    return [slice(g * size, (g + 1) * size) for g in range(groups)]
