"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, and ``Qwen3VLMoeForConditionalGeneration`` through the same
adapter): Qwen2-VL's image layout (block-major 2x2 patch groups, one (t, h, w) grid per image) with interleaved
M-RoPE, a ViT without [CLS] or windows, and **DeepStack**: features of several ViT blocks are added to the hidden
states after the first decoder layers at the visual positions (docs/families/qwen3_vl.md).

What this family adds:

* **DeepStack, pre-LLM.** The language model gets ``visual_pos_masks [b, L]`` and ``deepstack_visual_embeds`` (one
  ``[N_visual, D]`` per level, rows in row-major (b, L) order of the mask). :meth:`gather_lm_inputs` keeps the mask's
  kept columns on the re-padded layout and each level's rows of the kept visual tokens. Merged tokens (methods that
  replace a kept token's state) keep the DeepStack features of the token they sit on.
* **DeepStack, in-LLM at K.** ``Qwen3VLTextModel`` adds level j after decoder layer j from locals that no hook can
  reach. For K < number of levels, :meth:`follow_layer_plan` sets ``language_model._deepstack_process`` as an
  instance attribute (removed with the handle) that gathers the mask and features to the kept tokens once the
  hidden states are the pruned ones; K >= levels needs nothing.
* **Positions**: (t, h, w) ids kept as on the full sequence (``get_rope_index``, which needs ``mm_token_type_ids``);
  ``generate`` passes 4 rows ``[text, t, h, w]``.
* **LLM q/k**: per-head ``q_norm``/``k_norm`` before RoPE, which the base ``llm_qk`` applies where the attention
  has them.
* **No [CLS]**: [CLS]-reading methods use the documented received-attention fallback, as for Qwen2-VL.

A family with the same tower and positions but no DeepStack (Qwen3.5) subclasses this adapter with
``deepstack = False``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..capture import MLPProjector, per_vector_norm
from ..errors import VTPruneError
from ..view import ImageLayout, Segment
from .base import LmmsWrapper, SyntheticImage
from .qwen2_vl import CHAT_TEMPLATE, Qwen2VLAdapter

VISUAL_MASK, DEEPSTACK = "visual_pos_masks", "deepstack_visual_embeds"


def _text(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def gather_deepstack(mask: torch.Tensor, embeds: list[torch.Tensor], plan: Any
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The DeepStack inputs of the tokens ``plan`` keeps: ``mask [b, L]`` of visual positions -> its kept columns on
    the plan's (re-padded) layout, padding slots off; each level ``[N_visual, D]`` (rows in row-major order of the
    mask) -> the rows of the kept visual tokens, in row-major order of the new mask."""
    mask = mask.to(plan.index.device)
    row_of = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    row_of[mask] = torch.arange(int(mask.sum()), device=mask.device)
    kept = plan.gather(row_of, seq_dim=1).masked_fill(~plan.valid, -1)
    new_mask = kept >= 0
    rows = kept[new_mask]
    return new_mask, [e[rows.to(e.device)] for e in embeds]


class _InstancePatch:
    """An attribute set on one module instance (shadowing its class's method), removable like a hook handle."""

    def __init__(self, module: nn.Module, name: str, value: Any) -> None:
        self.module, self.name, self.value = module, name, value
        setattr(module, name, value)

    def remove(self) -> None:
        if self.module.__dict__.get(self.name) is self.value:
            delattr(self.module, self.name)


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL layouts and M-RoPE positions; DeepStack features follow the plan."""

    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    bench_configs = ("qwen3-vl-8b",)
    lmms = LmmsWrapper("vtprune_qwen3_vl", simple="lmms_eval.models.simple.qwen3_vl.Qwen3_VL",
                       chat="lmms_eval.models.chat.qwen3_vl.Qwen3_VL", takes=("attn_implementation",))
    #: whether the vision tower feeds DeepStack features to the first decoder layers (off for Qwen3.5)
    deepstack: bool = True

    def _mlp(self) -> MLPProjector | None:
        """The merger as LayerNorm (each patch, or all 4 at once with ``use_postshuffle_norm``) -> Linear -> GELU ->
        Linear, for the structured ZO estimator; ``None`` for a merger of another shape."""
        p = self.projector
        if not per_vector_norm(getattr(p, "norm", None)) \
                or not all(hasattr(p, n) for n in ("linear_fc1", "act_fn", "linear_fc2")):
            return None
        return MLPProjector(first=p.linear_fc1, act=p.act_fn, last=p.linear_fc2, norm=p.norm)

    def video_layout(self, features: torch.Tensor, positions: torch.Tensor) -> ImageLayout:
        """A video is laid out frame by frame, each temporal group a grid after its own timestamp text, with its own
        temporal id and (h, w) ids offset by where the group starts: the groups are the runs of equal temporal ids."""
        t = positions[-3]
        cuts = [0, *(torch.nonzero(t[1:] != t[:-1]).flatten() + 1).tolist(), t.numel()]
        frames = []
        for a, b in itertools.pairwise(cuts):
            h, w = (int(p[a:b].max() - p[a:b].min()) + 1 for p in positions[-2:])
            if h * w != b - a:
                raise VTPruneError(f"a video frame's {b - a} tokens do not tile its {h}x{w} position grid")
            frames.append(Segment(h, w))
        return ImageLayout(tuple(frames), tuple(range(len(frames))))

    @classmethod
    def deepstack_levels(cls, config: Any) -> int:
        """Number of DeepStack levels (decoder layers 0..levels-1 get one added after them); 0 without DeepStack."""
        if not cls.deepstack:
            return 0
        return len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())

    # ---- DeepStack ------------------------------------------------------------------------------------
    def gather_lm_inputs(self, kwargs: dict[str, Any], plan: Any) -> None:
        mask, embeds = kwargs.get(VISUAL_MASK), kwargs.get(DEEPSTACK)
        if mask is None or embeds is None:
            return
        kwargs[VISUAL_MASK], kwargs[DEEPSTACK] = gather_deepstack(mask, list(embeds), plan)

    def follow_layer_plan(self, layer: int, rows: Callable[[], Any]) -> list[Any]:
        """For K < levels, layers >= K run on the kept tokens but are still followed by DeepStack additions over
        the full sequence: wrap ``_deepstack_process`` (an instance attribute) to gather mask and features."""
        levels = self.deepstack_levels(self.model.config)
        if layer >= levels:
            return []
        lm = self.language_model
        original = lm._deepstack_process  # the bound class method

        def deepstack_process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                              visual_embeds: torch.Tensor) -> torch.Tensor:
            plan = rows()
            if (plan is not None and visual_pos_masks is not None and hidden_states.shape[1] == plan.length
                    and visual_pos_masks.shape[1] == plan.full_len):
                visual_pos_masks, (visual_embeds,) = gather_deepstack(visual_pos_masks, [visual_embeds], plan)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        return [_InstancePatch(lm, "_deepstack_process", deepstack_process)]

    # ---- FLOPs ----------------------------------------------------------------------------------------
    @classmethod
    def _vit_dims(cls, vc: Any) -> tuple[int, int, int, set[int]]:
        """A two-matrix GELU FFN; full attention in every block."""
        return vc.hidden_size, vc.out_hidden_size, 2 * vc.hidden_size * vc.intermediate_size, set(range(vc.depth))

    @classmethod
    def vision_flops(cls, config: Any, work: Any) -> dict[str, int]:
        """Qwen2-VL's count with this tower's dimensions, plus one PatchMerger per DeepStack level (each maps the
        same 2x2 groups as the final merger)."""
        out = super().vision_flops(config, work)
        out["projector"] *= 1 + cls.deepstack_levels(config)
        return out

    @classmethod
    def llm_layer_flops(cls, config: Any, layer: int, queries: int, keys: int, causal: bool
                        ) -> tuple[int, int] | None:
        """Dense layers: the LLaMA formula (``None``). MoE layers: the attention projections, the router
        (``d × experts``) and the top-k routed experts' gated FFN (``3·d·moe_intermediate`` each) per token."""
        t = _text(config)
        experts = getattr(t, "num_experts", 0) or 0
        sparse = experts > 0 and layer not in (getattr(t, "mlp_only_layers", None) or ()) \
            and (layer + 1) % getattr(t, "decoder_sparse_step", 1) == 0
        if not sparse:
            return None
        d, hd = t.hidden_size, getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        h, kv = t.num_attention_heads, t.num_key_value_heads
        proj = 2 * queries * d * (2 * h * hd + 2 * kv * hd)
        ffn = 2 * queries * (d * experts + 3 * d * t.num_experts_per_tok * t.moe_intermediate_size)
        pairs = queries * (queries + 1) // 2 if causal and queries == keys else queries * keys
        return proj + ffn, 4 * h * hd * pairs

    # ---- family level: tiny model, benchmark image ----------------------------------------------------
    @classmethod
    def _tiny_vision(cls) -> dict[str, Any]:
        """The tiny Qwen3 ViT: 3 blocks of width 32, 16-px patches as released (lmms-eval's wrapper resizes images
        for them), an 8x8 learned position grid; every block feeds a DeepStack level (so the default in-LLM K=2
        falls inside the DeepStack layers)."""
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64)
        if cls.deepstack:
            vision["deepstack_visual_indexes"] = [0, 1, 2]
        return vision

    @classmethod
    def tiny_parts(cls, num_layers: int, moe: bool = False) -> tuple[Any, Any]:
        """head_dim 16 with interleaved M-RoPE sections [2, 3, 3]; images of 64² to 128² px in 16-px patches;
        ``moe`` builds Qwen3-VL-MoE (4 experts, top 2)."""
        import transformers as tf

        tok, _, _, common = cls._tiny_common(num_layers)
        improc = tf.Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                          size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128})
        text = dict(common.pop("text_config"), head_dim=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                     "mrope_section": [2, 3, 3]})
        if moe:
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        video = tf.Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, cap_pixels_per_frame=False,
                                         size={"shortest_edge": 64 * 64, "longest_edge": 4 * 128 * 128})
        proc = tf.Qwen3VLProcessor(improc, tok, video, chat_template=CHAT_TEMPLATE)
        config_class = tf.Qwen3VLMoeConfig if moe else tf.Qwen3VLConfig
        return config_class(text_config=text, vision_config=cls._tiny_vision(), **common), proc

    @classmethod
    def _video_placeholders(cls, config: Any, groups: int, per_group: int) -> torch.Tensor:
        """One span per temporal group between vision start and end, as the processor writes them (the timestamp
        text before each group is left out of a synthetic prompt)."""
        span = torch.cat([torch.tensor([config.vision_start_token_id]), torch.full((per_group,), config.video_token_id),
                          torch.tensor([config.vision_end_token_id])])
        return span.repeat(groups)

    @classmethod
    def synthetic_image(cls, config: Any, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """As Qwen2-VL's; the default size is 24 x 24 merged tokens (576: 768 x 768 px with 16-px patches), and a
        size that is not a multiple of patch × merge is rounded to the nearest one, as the image processor does."""
        vc = config.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        size = tuple(max(unit, round(s / unit) * unit) for s in size) if size else (24 * unit, 24 * unit)
        return super().synthetic_image(config, size, generator)
