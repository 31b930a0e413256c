"""Attention inputs a pruner can ask for, captured by hooks without touching the attention kernels.

Pre-hooks on an attention module remember its inputs during the forward; q/k are then recomputed from
them for exactly the tokens a pruner needs (SDPA / FlashAttention keep running untouched). Adapters
know the per-family projection and position details; this module holds the family-free pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: what a pruner may declare in ``Pruner.needs``
LLM_QK = "llm_qk"  # post-RoPE q/k of decoder layer K-1 (in-LLM site)
VISION_QK = "vision_qk"  # q/k of vision-encoder attention layers (``Pruner.vision_layers``)
PROJECTOR = "projector"  # the projector's inputs per visual token, and the projector itself
FINAL_NORM = "final_norm"  # the language model's final norm (DART compares final-normed hidden states)
HINTS = "hints"  # per-sample values the caller passes with ``PruneHandle.set_hints`` (informed references)
NEEDS = (LLM_QK, VISION_QK, PROJECTOR, FINAL_NORM, HINTS)


@dataclass
class LLMQK:
    """Post-RoPE query/key of decoder layer K-1 for one sample's real (non-padding) tokens.

    query [H, n, hd], key [H_kv, n, hd] (GQA: heads share keys in groups of H // H_kv);
    image [V]: where this image's tokens sit among the n tokens; text [T]: where the rows of
    ``VisualView.text`` sit among them; the last prompt token is index n-1.
    """

    query: torch.Tensor
    key: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor
    scaling: float


@dataclass
class VisionQK:
    """Query/key of one vision-encoder attention layer for one encoder view of an image.

    query/key [H, P, hd] for the view's P patches (no [CLS]); cls_query/cls_key [H, hd] when the encoder
    has a [CLS] token (CLIP), else ``None``. token_of_patch [P]: the image's visual-token index (0..V-1)
    each patch ends up in (several patches share one token after a 2x2 merge; -1 where LLaVA-NeXT's
    unpadding drops the patch).
    """

    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    token_of_patch: torch.Tensor
    cls_query: torch.Tensor | None = None
    cls_key: torch.Tensor | None = None


@dataclass
class ProjectorInput:
    """What the multimodal projector (LLaVA MLP / Qwen 2x2 PatchMerger) turned into one image's tokens.

    inputs [V, g, d_v]: the g encoder features feeding each visual token (g = 1 for LLaVA, 4 for a 2x2
    merge); valid [V]: tokens that have projector inputs (LLaVA-NeXT newline tokens do not);
    project: maps [n, g, d_v] -> [n, D], exactly as the model does.
    """

    inputs: torch.Tensor
    valid: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]
    mlp: "MLPProjector | None" = None


@dataclass
class MLPProjector:
    """The structure of a ``Linear -> activation -> Linear`` projector (LLaVA's), for estimators that can
    exploit it (the first layer is linear in its input, the last is an isometry up to its singular values)."""

    first: torch.nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    last: torch.nn.Linear


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding (rotate-half convention) to x [..., n, hd] with cos/sin broadcastable."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class InputCapture:
    """A forward pre-hook that keeps the (args, kwargs) of the module's last call while armed."""

    def __init__(self, armed: bool = False) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.armed = armed

    def __call__(self, module, args, kwargs) -> None:
        if self.armed:
            self.calls.append((args, kwargs))

    def reset(self) -> None:
        self.calls = []

    def tensor(self, name: str, position: int = 0, call: int = -1) -> torch.Tensor:
        """The named input of a captured call (looked up in kwargs first, then positionally)."""
        args, kwargs = self.calls[call]
        return kwargs[name] if name in kwargs else args[position]
