"""Merging with proportional attention (ToMe, arXiv 2210.09461), ``merge="proportional"``: the key bias.

Each visual token a pruner drops is merged into the kept token of the same image whose state is most similar
(cosine of the states being pruned: projected features pre-LLM, layer K's input hidden states in-LLM;
:func:`vtprune.ops.merge_dropped`); the kept token's state becomes the size-weighted mean of everything merged into
it, its size the sum, and it keeps its own position. From then on — every layer pre-LLM, layers >= K in-LLM (layers
< K keep every token, unbiased) — every attention logit on that key gets ``+log size`` (prefill, every decode step,
later turns), carried in an additive 4-D attention mask so eager and SDPA attention run unchanged. A later cut of a
multi-stage schedule merges tokens of known sizes, so sizes add up across cuts and each layer group biases its own
cached keys. ``n`` copies of a token that share one position (equal post-RoPE keys and values) then give exactly
the attention output of the ``n`` copies to every query after the last copy; anything else is an approximation
(docs/algorithms.md, "Merging with proportional attention").
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import VTPruneError
from .plan import to_mask_kind

#: attention implementations that take an additive float 4-D mask as given (a per-key bias)
BIASED_ATTENTION = ("eager", "sdpa")


def check_merge_support(adapter: Any) -> None:
    """Refuse (at ``apply``) a model whose attention cannot take an exact per-key logit bias."""
    impl = adapter.attn_implementation
    if impl not in BIASED_ATTENTION:
        raise VTPruneError(
            f"merge='proportional' needs attn_implementation in {BIASED_ATTENTION}: the +log(size) bias of a merged "
            f"token travels in an additive 4-D attention mask, which {impl!r} cannot take (FlashAttention-2 has no "
            "per-key bias); load the model with attn_implementation='sdpa'")
    types = set(getattr(adapter.language_model.config, "layer_types", None) or ("full_attention",))
    if types != {"full_attention"}:
        raise VTPruneError(
            f"merge='proportional' is not supported on {type(adapter).__name__} models: their decoder has "
            f"{sorted(types)} layers, and only full-attention layers take the +log(size) key bias through the one "
            "shared 4-D mask (linear attention has no logits to bias; sliding-window layers get masks of their own)")


def biased_mask(mask: Any, bias: torch.Tensor, q: int, kv: int, impl: str, dtype: torch.dtype,
                static: bool = False) -> torch.Tensor:
    """A call's attention mask over ``kv`` keys (its ``q`` queries last) as a 4-D additive mask with ``bias``
    [b, n] (``log size`` of the first n cache slots) added wherever a query may attend. ``mask``: what the site
    would pass otherwise — none (causal, all real), a 2-D padding mask [b, kv], or a 4-D boolean or additive
    mask; ``static``: the call writes a static cache (refused)."""
    if static:
        raise VTPruneError("merge='proportional' with a static cache: its fixed-width masks are built by "
                           "generate and cannot carry the key bias; use a dynamic cache")
    if impl not in BIASED_ATTENTION:
        raise VTPruneError(f"merge='proportional' with attn_implementation {impl!r}: the model's attention was "
                           f"switched after apply; it needs one of {BIASED_ATTENTION}")
    b, dev = bias.shape[0], bias.device
    if torch.is_tensor(mask) and mask.dim() == 4:
        floating = mask.dtype != torch.bool
        allowed = mask > torch.finfo(mask.dtype).min / 2 if floating else mask
        base = mask.to(dtype) if floating else to_mask_kind(allowed, "additive", dtype)
    elif mask is None or (torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[-1] == kv):
        causal = torch.arange(kv, device=dev)[None, :] <= torch.arange(kv - q, kv, device=dev)[:, None]
        allowed = causal[None, None].expand(b, 1, q, kv)
        if mask is not None:
            allowed = allowed & mask.to(dev).bool()[:, None, None, :]
        base = to_mask_kind(allowed, "additive", dtype)
    else:
        raise VTPruneError(f"merge='proportional' cannot add its key bias to an attention mask of type "
                           f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}: expected none, a 2-D "
                           f"padding mask over {kv} keys or a 4-D mask")
    if base.shape[-1] != kv or bias.shape[1] > kv:
        raise VTPruneError(f"merge='proportional': a mask over {base.shape[-1]} keys and a key bias over "
                           f"{bias.shape[1]} cache slots for an attention over {kv} keys")
    key_bias = torch.zeros(b, kv, dtype=dtype, device=dev)
    key_bias[:, :bias.shape[1]] = bias.to(dtype)
    return base + torch.where(allowed, key_bias[:, None, None, :], torch.zeros((), dtype=dtype, device=dev))
