"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``, and ``Qwen3_5MoeForConditionalGeneration`` through the same
adapter): the Qwen3-VL vision tower and interleaved M-RoPE without DeepStack, in front of a hybrid decoder of
Gated-DeltaNet linear-attention layers and gated full-attention layers (every 4th layer in the released models).

What this family adds (docs/families/qwen3_5.md):

* **Linear-attention layers** (``recurrent_layers``) keep a conv state (the last ``linear_conv_kernel_dim`` conv
  inputs) and a recurrent state in the cache, nothing per token. They take a 2-D padding mask over the call's own
  tokens (``create_recurrent_attention_mask``) or none. In-LLM pruning at K: linear layers >= K run over the kept
  tokens only (their state then summarises the kept tokens, and the conv mixes tokens that were not adjacent); the
  site gathers their 2-D mask to the kept tokens and never hands them a 4-D mask.
* **The cache length** transformers reads (``get_seq_length``, which sizes the model-built masks and default
  positions) is the first *full-attention* layer's. In-LLM pruning at K <= that layer would make it the pruned
  length while layers < K hold the full one, so :meth:`check_site` refuses such K.
* **Full-attention layers**: ``q_proj`` emits the query and an output gate (2·head_dim per head), q/k are
  RMS-normed per head before a *partial* rotary embedding (``partial_rotary_factor``); :meth:`llm_qk` follows it.
  Pruners that read decoder attention at K-1 need a full-attention layer there (refused otherwise).
* **FLOPs**: :meth:`llm_layer_flops` describes each layer's work as torch runs it on CPU (conv1d, the chunked gated
  delta rule's matmuls, routed experts), which :mod:`vtprune.flops` sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..capture import InputCapture, rotate
from ..errors import VTPruneError
from .base import LmmsWrapper, SyntheticImage
from .qwen2_vl import CHAT_TEMPLATE
from .qwen3_vl import Qwen3VLAdapter, _text

LINEAR = "linear_attention"
#: chunk length of transformers' torch gated-delta-rule kernel (``torch_chunk_gated_delta_rule``)
DELTA_CHUNK = 64


def _layer_types(config: Any) -> list[str]:
    return list(_text(config).layer_types)


def _first_full(config: Any) -> int | None:
    return next((i for i, t in enumerate(_layer_types(config)) if t != LINEAR), None)


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3.5 and Qwen3.5-MoE: Qwen3-VL's vision tower, layouts and M-RoPE positions without DeepStack; a hybrid
    linear/full-attention decoder."""

    family = "qwen3_5"
    model_classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
    bench_configs = ("qwen3.5-9b",)
    lmms = LmmsWrapper("vtprune_qwen3_5", simple="lmms_eval.models.simple.qwen3_5.Qwen3_5",
                       chat="lmms_eval.models.chat.qwen3_5.Qwen3_5", takes=("attn_implementation",))
    deepstack = False
    site_limits: ClassVar[Mapping[str, str]] = {
        "layer": "K must come after the first full-attention layer (K >= 4 on the released models: the cache length "
                 "transformers reads is that layer's); attention-reading methods (FastV, DART, ...) need a "
                 "full-attention layer at K-1 (K = 4, 8, ...)"}

    # ---- the hybrid decoder -------------------------------------------------------------------------
    @property
    def recurrent_layers(self) -> frozenset[int]:
        return frozenset(i for i, t in enumerate(_layer_types(self.model.config)) if t == LINEAR)

    def check_site(self, config: Any, needs: frozenset[str]) -> None:
        if config.site != "layer":
            return
        k, first = config.layer, _first_full(self.model.config)
        if first is None or k <= first:
            raise VTPruneError(
                f"layer={k}: Qwen3.5 in-LLM pruning needs K after the first full-attention layer ({first}). "
                "transformers reads the cache length from that layer, so with K <= it the decode masks and "
                "positions would be built from the pruned length while the layers before K cached the whole "
                f"prompt; use K >= {(first or 0) + 1}")
        if "llm_qk" in needs and k - 1 in self.recurrent_layers:
            full = [i + 1 for i, t in enumerate(_layer_types(self.model.config)) if t != LINEAR and i + 1 > first]
            raise VTPruneError(
                f"pruner {config.name!r} reads the attention of decoder layer K-1 = {k - 1}, a linear-attention "
                f"(Gated DeltaNet) layer with no attention map; choose K with a full-attention layer at K-1, "
                f"e.g. K in {full[:4]}")

    def llm_attention(self, layer: int) -> nn.Module:
        if layer in self.recurrent_layers:
            raise VTPruneError(f"decoder layer {layer} of Qwen3.5 is a linear-attention layer: it has no attention "
                               "map to read")
        return self.layers[layer].self_attn

    def llm_qk(self, layer: int, capture: InputCapture) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Gated attention: ``q_proj`` gives [query | gate] per head; q_norm/k_norm per head, then RoPE on the
        first ``cos.shape[-1]`` dims of each head only (partial rotary)."""
        attn = self.llm_attention(layer)
        hidden = capture.tensor("hidden_states")
        cos, sin = capture.tensor("position_embeddings", 1)
        b, n, _ = hidden.shape
        q = attn.q_proj(hidden).view(b, n, -1, 2 * attn.head_dim)[..., :attn.head_dim]
        q = attn.q_norm(q).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(hidden).view(b, n, -1, attn.head_dim)).transpose(1, 2)
        rot = cos.shape[-1]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = torch.cat([rotate(q[..., :rot], cos, sin), q[..., rot:]], -1)
        k = torch.cat([rotate(k[..., :rot], cos, sin), k[..., rot:]], -1)
        return q, k, float(attn.scaling)

    # ---- FLOPs --------------------------------------------------------------------------------------
    @classmethod
    def llm_layer_flops(cls, config: Any, layer: int, queries: int, keys: int, causal: bool = False
                        ) -> tuple[int, int]:
        """(projections + FFN, token mixing) FLOPs of decoder layer ``layer`` for ``queries`` new tokens of one
        sequence (``keys`` = cache length after them; ``keys == queries`` for a prefill), as FlopCounterMode
        counts torch's CPU path: gated full attention (q_proj doubled for the gate); linear attention = its
        projections, the depthwise causal conv1d, and the matmuls of the chunked gated delta rule (prefill) —
        the one-token recurrent update has none; the FFN or the MoE block as routed (top-k experts per token
        plus the shared expert and its gate)."""
        t = _text(config)
        d, n = t.hidden_size, queries
        if getattr(t, "num_experts", None):
            ffn = 2 * n * (d * t.num_experts + 3 * d * t.num_experts_per_tok * t.moe_intermediate_size
                           + 3 * d * t.shared_expert_intermediate_size + d)
        else:
            ffn = 2 * n * 3 * d * t.intermediate_size
        if t.layer_types[layer] != LINEAR:
            hd, h, kv = t.head_dim, t.num_attention_heads, t.num_key_value_heads
            proj = 2 * n * d * (2 * h * hd + 2 * kv * hd + h * hd)
            pairs = queries * (queries + 1) // 2 if causal and queries == keys else queries * keys
            return proj + ffn, 4 * h * hd * pairs
        dk, dv = t.linear_key_head_dim, t.linear_value_head_dim
        hv = t.linear_num_value_heads
        key_dim, value_dim = t.linear_num_key_heads * dk, hv * dv
        conv_dim, kernel = 2 * key_dim + value_dim, t.linear_conv_kernel_dim
        proj = 2 * n * d * (conv_dim + value_dim + 2 * hv) + 2 * n * value_dim * d
        if queries == 1 and keys > 1:  # cached decode: conv over the kernel-long state + the token, no matmul
            return proj + ffn, 2 * conv_dim * kernel * 2
        continued = keys > queries  # a multi-token call after cached ones: the conv sees the cached state too
        conv_len = n + (kernel if continued else 0)
        mixing = 2 * conv_dim * kernel * (conv_len + kernel - 1)
        chunks = math.ceil(n / DELTA_CHUNK)
        c = DELTA_CHUNK
        # per chunk and value head: k_beta·kᵀ and q·kᵀ (c×c×dk each), then the scan: k_cumdecay·S and q·S
        # (c×dk×dv each), attn·v_new (c×c×dv), kᵀ·v_new (dk×c×dv)
        mixing += 2 * hv * chunks * (2 * c * c * dk + 3 * c * dk * dv + c * c * dv)
        return proj + ffn, mixing

    # ---- family level: tiny model ---------------------------------------------------------------------
    @classmethod
    def tiny_parts(cls, num_layers: int, moe: bool = False) -> tuple[Any, Any]:
        """Linear and full-attention layers alternating (full at 1, 3, ...), head_dim 16 with half of it rotary;
        ``moe`` builds Qwen3.5-MoE (4 experts, top 2, a shared expert)."""
        import transformers as tf

        tok, _, _, common = cls._tiny_common(num_layers)
        # 16-px patches as released (lmms-eval's Qwen3-VL/3.5 wrappers resize images for 16-px patches themselves)
        improc = tf.Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                          size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128})
        text = dict(common.pop("text_config"), head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
                    linear_num_key_heads=2, linear_num_value_heads=4,
                    layer_types=[LINEAR if i % 2 == 0 else "full_attention" for i in range(num_layers)],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                     "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]})
        if moe:
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32)
        vision = dict(cls._tiny_vision(), patch_size=16)
        video = tf.Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, cap_pixels_per_frame=False,
                                         size={"shortest_edge": 64 * 64, "longest_edge": 4 * 128 * 128})
        proc = tf.Qwen3VLProcessor(improc, tok, video, chat_template=CHAT_TEMPLATE)
        config_class = tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config
        return config_class(text_config=text, vision_config=vision, **common), proc

    @classmethod
    def synthetic_image(cls, config: Any, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """As Qwen3-VL's, with ``size`` rounded to the patch x merge grid (as the processor's resize would)."""
        unit = config.vision_config.patch_size * config.vision_config.spatial_merge_size
        size = None if size is None else tuple(max(unit, round(s / unit) * unit) for s in size)
        return super().synthetic_image(config, size, generator)
