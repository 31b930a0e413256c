"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower (no [CLS]) whose 64x64 patch grid is average-pooled
4x4 into 256 tokens per view, inside a Gemma 3 decoder of sliding-window and full-attention layers where the
tokens of one image view attend to each other bidirectionally.

What is family-specific, and how vtprune handles it (docs/families/gemma3.md):

* **Views.** Each encoded view — the image, or with pan-and-scan the image and each of its crops — is one run of
  ``<image_soft_token>`` placeholders and one bidirectional block; vtprune prunes each view as an image of its own
  (its own budget, a 16x16 grid).
* **Masks.** The backbone turns the 2-D mask and ``token_type_ids`` into a dict of 4-D masks
  ``{full_attention, sliding_attention}`` before the language model's pre-hook. After a prune, vtprune rebuilds
  that dict with the model's own mask functions for the kept tokens (:meth:`Gemma3Adapter.lm_masks`): the image
  blocks are the kept tokens of each view, and **sliding windows count kept tokens (cache slots)**. That is the
  exact semantics: the stock model on the hand-shortened input builds exactly these masks, and a sliding-window
  cache holds the last ``window - 1`` *kept* tokens, so decoding from the pruned cache continues the same
  computation. (Gathering the full-length masks instead would keep windows in original distances at prefill and
  could not be continued from the sliding cache.) At decode and on later text turns the masks of the pruned
  layers are rebuilt on their own caches (the model sizes them on layer 0 / the first full layer).
* **Positions** are 1-D and original (``position_ids`` and each layer type's rotary cos/sin are gathered).
* **Embeddings** are scaled by sqrt(hidden) for text only; pruning acts on the merged embeddings, so nothing to do.
* **[CLS]-based methods** use the received-attention fallback (SigLIP has no [CLS]).
* **Refused:** a new image in a later turn on a cached conversation (the backbone builds 4-D masks for it that
  mix conversation and cache coordinates; the engine refuses by name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..capture import InputCapture, ProjectorInput, VisionQK
from ..errors import VTPruneError
from ..view import ImageLayout
from .base import (
    ImageSpans,
    LmmsWrapper,
    ModelAdapter,
    SyntheticImage,
    VisionWork,
    tiny_text_config,
    tiny_tokenizer,
)
from .llava import LlavaAdapter

#: the tiny Gemma 3 models' chat template (``<start_of_turn>`` turns; the processor expands ``<start_of_image>``)
CHAT_TEMPLATE = (
    "{% for m in messages %}<start_of_turn> {{ 'model' if m['role'] == 'assistant' else m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }} "
    "{% endif %}{% endfor %}<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> model {% endif %}"
)
#: processor options that give the tiny model's wide or tall images pan-and-scan crops
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 28}
SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>",
            "<end_of_turn>"]


class Gemma3Adapter(ModelAdapter):
    """One image view = one run of soft tokens = one square grid = one bidirectional block."""

    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    bench_configs = ("gemma-3-4b",)
    vision_cls = False
    tiny_eos = "<end_of_turn>"
    lmms = LmmsWrapper("vtprune_gemma3", simple="lmms_eval.models.simple.gemma3.Gemma3", chat=None,
                       takes=("attn_implementation",))

    # ---- images ------------------------------------------------------------------------------------
    def image_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        """``mm_tokens_per_image`` per encoded view (``pooler_output`` is one tensor over all views)."""
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        views = encoded.pooler_output.shape[0] if encoded is not None and torch.is_tensor(encoded.pooler_output) \
            else None if inputs.get("pixel_values") is None else inputs["pixel_values"].shape[0]
        return None if views is None else [int(self.model.config.mm_tokens_per_image)] * int(views)

    def locate_images(self, inputs: dict[str, Any]) -> ImageSpans | None:
        spans = super().locate_images(inputs)
        types, ids = inputs.get("token_type_ids"), inputs.get("input_ids")
        ref = ids if ids is not None else inputs.get("inputs_embeds")
        if spans is not None and torch.is_tensor(types) and ref is not None and types.shape[-1] >= ref.shape[1]:
            from transformers.models.gemma3.modeling_gemma3 import (
                get_block_sequence_ids_for_mask,
            )

            # a later turn may come with the whole conversation's types: this call's tokens are the last ones
            spans.blocks = get_block_sequence_ids_for_mask(types[:, -ref.shape[1]:], device=ref.device)
        return spans

    # ---- decoder attention ------------------------------------------------------------------------------
    def llm_window(self, layer: int) -> int | None:
        cfg = self.language_model.config
        return cfg.sliding_window if cfg.layer_types[layer] == "sliding_attention" else None

    # ---- masks ---------------------------------------------------------------------------------------
    def mask_key(self, layer: int) -> str:
        return self.language_model.config.layer_types[layer]

    def lm_masks(self, embeds: torch.Tensor, padding: torch.Tensor | None, cache: Any, from_layer: int,
                 blocks: torch.Tensor | None = None) -> dict[str, Any]:
        """``{full_attention, sliding_attention}`` as ``Gemma3Model`` builds them (``create_masks_for_vision_model``
        with block ids, else causal), sized on the first layer of each type at or after ``from_layer``."""
        from transformers.masking_utils import (
            blockwise_overlay,
            create_causal_mask,
            maybe_pad_block_sequence_ids,
            sliding_window_overlay,
        )

        cfg = self.language_model.config
        types = list(cfg.layer_types)
        out: dict[str, Any] = {}
        for kind in ("full_attention", "sliding_attention"):
            if kind not in types[from_layer:]:
                out[kind] = None
                continue
            layer = types.index(kind, from_layer)
            kw = dict(config=cfg, inputs_embeds=embeds, attention_mask=padding, past_key_values=cache,
                      position_ids=None, layer_idx=layer)
            if kind == "full_attention":
                out[kind] = create_causal_mask(**kw, block_sequence_ids=blocks)
                continue
            window = sliding_window_overlay(cfg.sliding_window)
            if blocks is None:
                out[kind] = create_causal_mask(**kw, and_mask_function=window)
                continue
            if cache is not None:
                kv_length, kv_offset = cache.get_mask_sizes(embeds.shape[1], layer)
            else:
                kv_length, kv_offset = (embeds.shape[1] if padding is None else padding.shape[-1]), 0
            padded = maybe_pad_block_sequence_ids(blocks, padding, kv_length, kv_offset)
            out[kind] = create_causal_mask(**kw, or_mask_function=blockwise_overlay(padded), and_mask_function=window)
        return out

    # ---- vision attention (SigLIP: no [CLS]; one encoder view per image view) ------------------------------
    # the tower sits where LLaVA's CLIP tower does (``backbone.vision_tower``): the same accessors
    vision_tower = LlavaAdapter.vision_tower
    _encoder_layers = LlavaAdapter._encoder_layers
    num_vision_layers = LlavaAdapter.num_vision_layers
    vision_attention = LlavaAdapter.vision_attention

    def _token_of_patch(self, device: torch.device) -> torch.Tensor:
        """[P] the pooled token each patch of a view is averaged into (AvgPool2d(k) over the patch grid)."""
        proj = self.backbone.multi_modal_projector
        p, t, k = proj.patches_per_image, proj.tokens_per_side, proj.kernel_size
        r = torch.arange(p, device=device)
        return ((r[:, None] // k) * t + r[None, :] // k).flatten()

    def _check_views(self, n_views: int, layouts: list[ImageLayout]) -> None:
        if n_views != len(layouts):
            raise VTPruneError(f"the vision tower encoded {n_views} views but the prompt holds {len(layouts)} image "
                               "views (runs of image tokens)")

    def vision_qk(self, layer: int, capture: InputCapture, tower: InputCapture,
                  layouts: list[ImageLayout]) -> list[list[VisionQK]]:
        attn = self.vision_attention(layer)
        hidden = capture.tensor("hidden_states", call=0)
        v, n, _ = hidden.shape
        self._check_views(v, layouts)
        q = attn.q_proj(hidden).view(v, n, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(v, n, -1, attn.head_dim).transpose(1, 2)
        token = self._token_of_patch(hidden.device)
        return [[VisionQK(query=q[i], key=k[i], scaling=float(attn.scale), token_of_patch=token)] for i in range(v)]

    # ---- projector (AvgPool k x k -> RMSNorm -> projection) -------------------------------------------
    @property
    def projector(self) -> nn.Module:
        return self.backbone.multi_modal_projector

    def projector_inputs(self, capture: InputCapture, tower: InputCapture, layouts: list[ImageLayout]
                         ) -> list[ProjectorInput]:
        x = capture.tensor("vision_outputs", call=0)  # [views, P, d_v]
        self._check_views(x.shape[0], layouts)
        order = torch.sort(self._token_of_patch(x.device), stable=True).indices  # each token's k*k patches
        out = []
        for view, layout in zip(x, layouts):
            inputs = view[order].view(layout.size, -1, x.shape[-1])
            valid = torch.ones(layout.size, dtype=torch.bool, device=x.device)
            out.append(ProjectorInput(inputs=inputs, valid=valid, project=self._project))
        return out

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """[n, k*k, d_v] -> [n, D]: the projector's mean pool, norm and projection."""
        p = self.projector
        return (p.mm_soft_emb_norm(x.mean(1)) @ p.mm_input_projection_weight).type_as(x)

    # ---- family level: FLOPs, tiny model, benchmark image -----------------------------------------------
    vision_work = LlavaAdapter.__dict__["vision_work"]  # every encoded view (pan-and-scan crops too)

    @classmethod
    def vision_flops(cls, config: Any, work: VisionWork) -> dict[str, int]:
        """SigLIP (every layer, no [CLS], no pooling head) + the projection of the pooled tokens, per view."""
        vc = config.vision_config
        if getattr(vc, "vision_use_head", False):
            raise VTPruneError("no FLOPs formula for a SigLIP tower with its attention-pooling head "
                               "(vision_use_head=True); Gemma 3 checkpoints run without it")
        s, dv = (vc.image_size // vc.patch_size) ** 2, vc.hidden_size
        conv = 2 * s * dv * vc.num_channels * vc.patch_size ** 2
        layer = 2 * s * (4 * dv * dv + 2 * dv * vc.intermediate_size) + 4 * s * s * dv
        proj = 2 * config.mm_tokens_per_image * dv * config.text_config.hidden_size
        return {"vision": work.views * (conv + vc.num_hidden_layers * layer), "projector": work.views * proj}

    @classmethod
    def llm_layer_flops(cls, config: Any, layer: int, queries: int, keys: int, causal: bool
                        ) -> tuple[int, int] | None:
        """Sliding-window layers: a decode step attends to the ``window - 1`` keys its cache keeps plus its own
        (eager/SDPA compute the full masked rectangle at prefill, as counted by default)."""
        t = config.text_config
        if t.layer_types[layer] != "sliding_attention" or keys == queries:
            return None
        d, h, kv, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
        linear = 2 * queries * (2 * d * h * hd + 2 * d * kv * hd + 3 * d * t.intermediate_size)  # q/o, k/v, gated FFN
        return linear, 4 * h * hd * queries * (min(keys - queries, t.sliding_window - 1) + queries)

    @classmethod
    def tiny_parts(cls, num_layers: int) -> tuple[Any, Any]:
        """A 2-layer 56-px SigLIP (4x4 patches pooled 2x2: 4 tokens per view) and a decoder whose every 4th layer
        is full attention, the others sliding with a window of 8. Pan-and-scan is the processor's option
        (``images_kwargs=PAN_AND_SCAN``)."""
        import transformers as tf

        tok = tiny_tokenizer(SPECIALS, CHAT_TEMPLATE)
        # named special tokens (``tok.boi_token``, ``tok.boi_token_id``, ...) that a saved tokenizer keeps
        tok._set_model_specific_special_tokens({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                "image_token": "<image_soft_token>"})
        layer_types = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(num_layers)]
        text = tiny_text_config(len(tok), num_hidden_layers=num_layers, head_dim=16, query_pre_attn_scalar=16,
                                sliding_window=8, layer_types=layer_types)
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=56, patch_size=14, vision_use_head=False)
        config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                 image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id,
                                 eoi_token_index=tok.eoi_token_id, pad_token_id=0)
        improc = tf.Gemma3ImageProcessor(size={"height": 56, "width": 56})
        proc = tf.Gemma3Processor(improc, tok, image_seq_length=4, chat_template=CHAT_TEMPLATE)
        return config, proc

    @classmethod
    def synthetic_image(cls, config: Any, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """One ``image_size²`` view (no pan-and-scan): ``mm_tokens_per_image`` placeholders whatever ``size`` says."""
        vc = config.vision_config
        pixels = torch.randn(1, vc.num_channels, vc.image_size, vc.image_size, generator=generator)
        return SyntheticImage(pixels, torch.full((config.mm_tokens_per_image,), config.image_token_id), {})

    @classmethod
    def prompt_inputs(cls, config: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``token_type_ids``: 1 on image placeholders (the model's bidirectional image blocks read it)."""
        return {"token_type_ids": (input_ids == config.image_token_id).long()}
