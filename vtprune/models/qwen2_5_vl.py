"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's language side; the ViT mixes window and
full-attention blocks and visits 2x2 groups in window order."""

from __future__ import annotations

from typing import Any

import torch

from .base import LmmsWrapper
from .qwen2_vl import CHAT_TEMPLATE, Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: the same language-side structure as Qwen2-VL (window attention stays inside the ViT)."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    bench_configs = ("qwen2.5-vl-7b",)
    lmms = LmmsWrapper("vtprune_qwen2_5_vl", simple="lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL",
                       chat="lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL", takes=("attn_implementation",))

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

    # ---- family level: FLOPs, tiny model ----------------------------------------------------------------
    @classmethod
    def _vit_dims(cls, vc: Any) -> tuple[int, int, int, set[int]]:
        """A gated FFN, and full attention only in ``fullatt_block_indexes``."""
        return vc.hidden_size, vc.out_hidden_size, 3 * vc.hidden_size * vc.intermediate_size, \
            set(vc.fullatt_block_indexes)

    @classmethod
    def _window_attention(cls, vc: Any, e: int, t: int, h: int, w: int, full_blocks: set[int]) -> int:
        """Σ over the real windows (partial ones at the edges) of (tokens in window)², in every windowed block."""
        if len(full_blocks) >= vc.depth:
            return 0
        m = vc.spatial_merge_size
        win = vc.window_size // m // vc.patch_size  # window side in merged cells
        rows = sum(r * r for r in _window_sides(h // m, win))
        cols = sum(c * c for c in _window_sides(w // m, win))
        window_sq = t * rows * cols * m ** 4
        return 4 * e * window_sq * (vc.depth - len(full_blocks))

    @classmethod
    def _video_timing(cls, config: Any, groups: int) -> dict[str, torch.Tensor]:
        """``second_per_grid_ts`` of a video sampled at 2 frames per second (qwen-vl-utils' default)."""
        return {"second_per_grid_ts": torch.tensor([config.vision_config.temporal_patch_size / 2.0])}

    @classmethod
    def tiny_parts(cls, num_layers: int) -> tuple[Any, Any]:
        import transformers as tf

        tok, improc, video, common = cls._tiny_common(num_layers)
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        proc = tf.Qwen2_5_VLProcessor(improc, tok, video, chat_template=CHAT_TEMPLATE)
        return tf.Qwen2_5_VLConfig(vision_config=vision, **common), proc


def _window_sides(n: int, size: int) -> list[int]:
    """Side lengths of the windows tiling ``n`` cells with windows of ``size`` (the last one may be partial)."""
    return [min(size, n - i) for i in range(0, n, size)]
