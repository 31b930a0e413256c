"""CDPruner (arXiv 2506.10967, NeurIPS 2025; docs/algorithms.md, ``cdpruner``): a conditional determinantal point
process over an image's tokens, whose kernel weighs their pairwise similarity by their relevance to the
instruction, and greedy MAP inference (Chen et al., 2018) to pick the k tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..config import ModeOption, PrunerConfig, is_number
from ..errors import VTPruneError
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import Pruner

#: clean mode stops the DPP once the best remaining gain is below this share of the largest kernel diagonal
RANK_TOLERANCE = 1e-5


@dataclass
class CDPrunerConfig(PrunerConfig, ModeOption):
    """theta: relevance weight θ in [0, 1): the kernel uses ``exp(α·r)`` with ``α = θ / (2(1-θ))`` for the
    relevance ``r`` (θ = 0: diversity only). ``None`` (default) = the mode's choice: θ = 0.5 in clean mode (the
    paper's weighted kernel, as the OpenVINO port), the plain min-max relevance in reference mode (the line is
    commented out in the reference code).

    mode: ``"clean"``: relevance = mean cosine to the instruction tokens, min-max normalised with ε in the
    denominator; when the kernel's rank is used up, the remaining picks go by relevance. ``"reference"``: the
    reference code's negated cosine, ε in the numerator, plain relevance, and its greedy arithmetic without a
    guard. Both keep exactly the budget."""

    name = "cdpruner"
    theta: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.theta is not None and (not is_number(self.theta) or not 0.0 <= self.theta < 1.0):
            raise VTPruneError(f"theta={self.theta!r}: expected None or a float in [0, 1)")
        self.validate_mode()


def instruction_relevance(features: torch.Tensor, text: torch.Tensor, reference: bool) -> torch.Tensor:
    """[V] each token's relevance to the instruction in [0, 1]: the mean cosine of its state to every text
    token's state, min-max normalised over the image. ``reference``: the cosine negated and
    ``(r - min + 1e-6) / (max - min)``; otherwise ``(r - min) / (max - min + 1e-6)``. All ones when there is
    no text or the relevance is constant (a plain DPP)."""
    if text.shape[0] == 0:
        return torch.ones(features.shape[0], device=features.device)
    rel = (ops.unit_rows(features) @ ops.unit_rows(text).T).mean(-1)
    if reference:
        rel = -rel
    lo, hi = rel.min(), rel.max()
    if bool(hi == lo):
        return torch.ones_like(rel)
    return (rel - lo + 1e-6) / (hi - lo) if reference else (rel - lo) / (hi - lo + 1e-6)


def conditional_kernel(unit: torch.Tensor, relevance: torch.Tensor, theta: float | None) -> torch.Tensor:
    """``L = diag(w)·S·diag(w)``, S the cosine matrix of the unit rows, ``w = r`` (θ None) or ``exp(α·r)``."""
    weight = relevance if theta is None else torch.exp(theta / (2 * (1 - theta)) * relevance)
    return weight[:, None] * (unit @ unit.T) * weight[None, :]


def dpp_greedy_map(kernel: torch.Tensor, k: int, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy MAP inference for a DPP with PSD kernel [V, V] (Chen et al., 2018): each step adds the token that
    most increases ``log det L_P``, i.e. the largest ``d²_i = L_ii - ‖c_i‖²`` (its squared distance, in the
    kernel's feature space, from the span of the picked tokens), updated incrementally in O(V·|P|) per step
    from the Cholesky rows ``c``. Ties go to the lowest index. Picks in pick order.

    ``fallback`` [V] (clean mode): once the best gain is ``<= RANK_TOLERANCE·max L_ii`` (the kernel's rank is
    used up), the remaining picks are the highest ``fallback`` scores. Without it the arithmetic follows the
    reference (no guard; picked tokens are masked so that the picks stay unique even where it turns NaN)."""
    size = kernel.shape[0]
    cis = kernel.new_zeros(k, size)
    gain = kernel.diagonal().clone()
    floor = RANK_TOLERANCE * float(gain.max()) if fallback is not None else None
    chosen = torch.zeros(size, dtype=torch.bool, device=kernel.device)
    picks = torch.empty(k, dtype=torch.long, device=kernel.device)
    for i in range(k):
        masked = gain.masked_fill(chosen, float("-inf"))
        j = masked.argmax()
        if floor is not None and float(masked[j]) <= floor:
            rest = torch.sort(fallback.masked_fill(chosen, float("-inf")), descending=True, stable=True).indices
            picks[i:] = rest[:k - i]
            break
        picks[i] = j
        chosen[j] = True
        if i == k - 1:
            break
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / gain[j].sqrt()
        cis[i] = e
        gain = gain - e * e
    return picks


@register_pruner
class CDPrunerPruner(Pruner):
    """CDPruner: conditional DPP over the view's states. Similarity ``S`` = cosine of the view's states in
    float32 (pre-LLM: the projector outputs, as the reference; reference mode normalises them in their own dtype
    first, as the reference does); relevance = mean cosine of each token to the
    sample's text token states (:func:`instruction_relevance`); kernel ``L = diag(w)·S·diag(w)``
    (:func:`conditional_kernel`); greedy MAP (:func:`dpp_greedy_map`) keeps k tokens, in original order.

    Departure from the reference (both modes): it scores relevance with CLIP's text tower on the raw question
    against CLIP patch embeddings; vtprune has no text tower and uses the LLM's own states of every non-visual
    token of the sample (prompt template included) against the view's states, as the OpenVINO port does for
    models without CLIP. LLaVA-NeXT views are selected together (the reference gives every view ``k``).
    See docs/algorithms.md, section ``cdpruner``."""

    config_class = CDPrunerConfig

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        reference = self.config.reference
        theta = self.config.theta if self.config.theta is not None or reference else 0.5
        relevance = instruction_relevance(view.features, view.text, reference)
        # the reference normalises in the model's dtype, then builds the kernel in float32
        unit = ops.unit_rows(view.features, view.features.dtype if reference else torch.float32).float()
        kernel = conditional_kernel(unit, relevance, theta)
        picks = dpp_greedy_map(kernel, k, fallback=None if reference else relevance)
        return Selection(indices=torch.sort(picks).values)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``2·V²·D + V·k²``: the cosine matrix, and the greedy MAP updates (step i projects a V-row on i
        Cholesky rows). The relevance (``2·V·T·D`` for T text tokens) is not counted."""
        return 2 * before * before * dim + before * kept * kept
