"""VisPruner (arXiv 2412.01818, ICCV 2025; docs/algorithms.md, ``vispruner``): a share of the budget goes to the
tokens the encoder's [CLS] attends to most (important), the rest to tokens that survive an iterative removal of
near-duplicates among the others (diverse)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..capture import PROJECTOR, VISION_QK, ProjectorInput
from ..config import ModeOption, PrunerConfig, is_number
from ..errors import VTPruneError
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import Pruner

#: the most residual tokens one duplicate-removal round drops (the reference's fixed 8)
DROP_PER_ROUND = 8


@dataclass
class VisPrunerConfig(PrunerConfig, ModeOption):
    """important: the share ρ of the budget kept as important tokens, ``k_imp = ⌊k·ρ⌋`` (the reference's
    ``important_ratio``, default 0.5; its README also uses 0.75 at 64 tokens); the other ``k - k_imp`` are
    diverse tokens. mode: ``"reference"`` computes the duplicate-removal cosines in the encoder features' dtype
    (fp16 in the reference), ``"clean"`` in float32; counts and rules are otherwise the same."""

    name = "vispruner"
    important: float = 0.5

    def validate(self) -> None:
        super().validate()
        if not is_number(self.important) or not 0.0 <= self.important <= 1.0:
            raise VTPruneError(f"important={self.important!r}: expected a fraction in [0, 1]")
        self.validate_mode()


def remove_duplicates(unit: torch.Tensor, residual: torch.Tensor, target: int) -> torch.Tensor:
    """VisPruner's diverse tokens: shrink the ordered ``residual`` list (token indices) to ``target`` tokens.
    Each round splits the list alternately into ``a`` (even places) and ``b`` (odd places), scores every ``a``
    by its largest cosine (rows of ``unit``) to any ``b`` and drops the ``min(8, |list| - target)`` highest
    scored ``a`` tokens (ties: the earlier place is dropped first); the next list is the surviving ``a`` in
    decreasing score, then all of ``b``. Every round drops ``min(r, |a|)`` tokens, so the list never goes
    below ``target``. The cosines of the whole list are computed once (one [R, R] product) and each round
    reads its ``a × b`` block from them, instead of one product per round (about ``R/8`` rounds)."""
    if target <= 0:
        return residual[:0]
    members = unit[residual]
    sim = members @ members.T
    place = torch.arange(residual.numel(), device=residual.device)  # places in the first list
    while (r := min(DROP_PER_ROUND, place.numel() - target)) > 0:
        a, b = place[0::2], place[1::2]  # b is never empty: |list| > target >= 1
        nearest = sim.index_select(0, a).index_select(1, b).amax(-1)
        survivors = torch.sort(nearest, descending=True, stable=True).indices[r:]
        place = torch.cat([a[survivors], b])
    return residual[place]


@register_pruner
class VisPrunerPruner(ops.ReadsEncoderAttention, Pruner):
    """VisPruner, pre-LLM and text-agnostic: the ``⌊k·ρ⌋`` tokens with the highest [CLS] attention (head mean,
    penultimate CLIP layer, the layer LLaVA's features come from; encoders without [CLS] (Qwen): the attention
    each token receives in the last full-attention block, pooled per 2x2 group, via
    :func:`vtprune.ops.cls_attention_scores`), then ``k - ⌊k·ρ⌋`` diverse tokens from the others, kept in
    decreasing attention order and thinned by :func:`remove_duplicates` on the cosine of the *pre-projector*
    features (Qwen: the four pre-norm patch vectors of a 2x2 group, concatenated).

    Choices: LLaVA-NeXT views are ranked together (the reference budgets each view separately and keeps every
    newline token); tokens without encoder features (LLaVA-NeXT newline tokens) are kept only when ``k``
    exceeds the tokens that have them. Ties go to the lowest index (the reference's GPU argsort leaves them
    open). See docs/algorithms.md, section ``vispruner``."""

    config_class = VisPrunerConfig
    sites = ("pre_llm",)
    needs = frozenset({VISION_QK, PROJECTOR})
    reads_cls = "always"

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        proj: ProjectorInput = view.extras["projector"]
        scores = ops.cls_attention_scores(view).masked_fill(~proj.valid, float("-inf"))
        featured = int(proj.valid.sum())
        if k >= featured:  # every token with features, then newline tokens by index
            return ops.top_k(scores, k)
        ranked = torch.sort(scores, descending=True, stable=True).indices[:featured]
        k_imp = int(k * self.config.important)
        dtype = proj.inputs.dtype if self.config.reference else torch.float32
        unit = ops.unit_rows(proj.inputs.flatten(1), dtype)
        diverse = remove_duplicates(unit, ranked[k_imp:], k - k_imp)
        return Selection(indices=torch.sort(torch.cat([ranked[:k_imp], diverse])).values)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> None:
        """``None``: the cost is the encoder's [CLS] rows (``O(H·N·d_h)`` per view) and the cosines of the
        residual tokens' pre-projector features (``2·R²·d_v``), in encoder dims the formula does not see; the
        about ``(V - k)/8`` duplicate-removal rounds then read ``(R/2)²`` of them each."""
        return None
