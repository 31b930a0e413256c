"""FastV (ECCV 2024): keep the image tokens the last prompt token attends to most at layer K-1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..capture import LLM_QK
from ..config import ModeOption, PrunerConfig
from ..registry import register_pruner
from ..view import VisualView
from .base import ScorerPruner
from .divprune import RoundedReferenceCount


@dataclass
class FastVConfig(PrunerConfig, ModeOption):
    """FastV at decoder layer K (default 2): scores come from layer K-1's attention.

    mode: ``"clean"`` keeps the exact budget (``⌊keep·V + 0.5⌋``); ``"reference"`` the Hugging Face
    integration's ``round(V·(1-R))`` with Python's half-to-even rounding (``keep = 1-R``; 12.5 -> 12), at
    least 1. The scores are the same in both modes."""

    name = "fastv"
    site: str = "layer"
    layer: int | None = None  # site="layer" fills in K = 2

    def validate(self) -> None:
        super().validate()
        self.validate_mode()


def last_token_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, window: int | None = None
                         ) -> torch.Tensor:
    """Head-mean attention of the last query (the last prompt token) over all n keys: [n]. No mask is
    needed: the last token attends to every earlier one — in a sliding-window layer, to the last ``window``
    (the others get 0)."""
    if window is None or window >= key.shape[-2]:
        return ops.attention_rows(query[:, -1:], key, scaling)[:, 0].mean(0)
    out = key.new_zeros(key.shape[-2], dtype=torch.float32)
    out[-window:] = ops.attention_rows(query[:, -1:], key[:, -window:], scaling)[:, 0].mean(0)
    return out


def fastv_scores(view: VisualView) -> torch.Tensor:
    """[V] head-mean attention of the last prompt token to each image token at layer K-1. The softmax runs
    over all of the sample's real tokens (as in the reference's eager attention map), so the image
    columns need not sum to 1."""
    qk = view.extras["llm_qk"]
    return last_token_attention(qk.query, qk.key, qk.scaling, qk.window)[qk.image]


@register_pruner
class FastVPruner(RoundedReferenceCount, ScorerPruner):
    """FastV: top-k image tokens by the last prompt token's attention in layer K-1, recomputed from that
    layer's captured post-RoPE q/k (one query row, O(H·n·d)), so SDPA/FlashAttention keep running; the
    reference reads the eager attention map instead. Counts: ``keep=1-R`` (or an int for the reference
    scripts' ``ATTENTION_RANK``), the exact budget in clean mode and ``round(V·(1-R))`` (half to even) in
    reference mode; kept tokens keep their original positions.
    See docs/algorithms.md, section ``fastv``."""

    config_class = FastVConfig
    sites = ("layer",)
    needs = frozenset({LLM_QK})

    def score(self, view: VisualView) -> torch.Tensor:
        return fastv_scores(view)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``2·V·D``: the last prompt token's query against the V image keys (heads × head dim = D). The
        text columns of its softmax and the recomputed layer-(K-1) q/k projections are not counted."""
        return 2 * before * dim
