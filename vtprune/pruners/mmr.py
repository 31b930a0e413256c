"""IDPruner-style Maximal Marginal Relevance (arXiv 2602.13315, spec ``algorithms.md`` §2) with a choice of
training-free importance signals, or a learned scorer loaded from a local file.

IDPruner's own importance is a *trained* scorer (VisionSelector); without one, the method here is
"IDPruner-MMR with <importance> importance" (spec §2.2), not IDPruner itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import attention, diversity
from ..capture import PROJECTOR, VISION_QK
from ..config import PrunerConfig
from ..errors import VTPruneError
from ..registry import register_pruner
from ..sensitivity import ZOOptions, ZOScorer
from ..view import Selection, VisualView
from .base import Pruner
from .divprune import ModeOption, RoundedReferenceCount

IMPORTANCES = ("norm", "text", "zoo", "cls", "pagerank", "learned")
#: signals each importance needs captured
IMPORTANCE_NEEDS = {"zoo": frozenset({PROJECTOR}), "cls": frozenset({VISION_QK}),
                    "pagerank": frozenset({VISION_QK})}


@dataclass
class MMRConfig(PrunerConfig, ZOOptions, ModeOption):
    """MMR: first the most important token, then ``argmax λ·Imp(i) - (1-λ)·max_{j∈P} cos(z_i, z_j)``.

    importance: the raw score ``w`` (min-max normalised to Imp with ε = 1e-6):
      * ``"norm"`` (default): L2 norm of each token's features. Free (no extra capture, O(V·D)), defined on
        every family and at both sites, query-agnostic like IDPruner's scorer input, and on MLP projectors it
        ranks tokens almost exactly like ZO sensitivity (Spearman ≈ 0.99, spec §1.10) at ~1/(2m) of the cost.
      * ``"text"``: mean cosine of each token to the sample's non-visual token states (``VisualView.text``:
        the prompt, question included). Query-aware, O((V+T)·D).
      * ``"zoo"``: ZO projector sensitivity (options ``directions``, ``step``, ``rank`` as for ``zoo``).
      * ``"cls"`` / ``"pagerank"``: vision-encoder attention scores from :mod:`vtprune.attention`.
      * ``"learned"``: a scorer loaded from ``scorer_path``.
    lam:         λ, importance vs. diversity trade-off in [0, 1] (0.5, the paper's best).
    scorer_path: a TorchScript file or a ``torch.save``d ``nn.Module`` mapping features [V, D] -> scores [V]
                 (raw logits, as the reference code uses them). Loading a pickled module runs its code: only
                 use files you trust.
    mode:        ``"reference"`` uses IDPruner's count rule ``k = round(ρ·V)`` (Python rounding, ≥ 1); the
                 selection itself (fp32 cosine, one pick per step) is the same in both modes.
    """

    name = "mmr"
    importance: str = "norm"
    lam: float = 0.5
    scorer_path: str | None = None

    def validate(self) -> None:
        super().validate()
        self.validate_zo()
        self.validate_mode()
        if self.importance not in IMPORTANCES:
            raise VTPruneError(f"importance={self.importance!r}: expected one of {IMPORTANCES}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0 <= self.lam <= 1:
            raise VTPruneError(f"lam={self.lam!r}: expected a float in [0, 1]")
        if (self.importance == "learned") != (self.scorer_path is not None):
            raise VTPruneError(f"scorer_path={self.scorer_path!r}: give a scorer file exactly when "
                               f"importance='learned' (importance is {self.importance!r})")
        if self.scorer_path is not None and not os.path.isfile(self.scorer_path):
            raise VTPruneError(f"scorer_path={self.scorer_path!r}: no such file")


def load_scorer(path: str) -> nn.Module:
    """A TorchScript module, else a pickled ``nn.Module`` (``torch.save(module, path)``), on the CPU."""
    try:
        return torch.jit.load(path, map_location="cpu")
    except RuntimeError:
        pass
    module = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(module, nn.Module):
        raise VTPruneError(f"scorer_path={path!r} holds a {type(module).__name__}, not an nn.Module")
    return module


def learned_scores(scorer: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """[V] scores of a learned scorer, run in its own dtype on the features' device."""
    param = next(scorer.parameters(), None)
    scorer.to(features.device)
    with torch.no_grad():
        out = scorer(features.to(param.dtype if param is not None else torch.float32))
    out = out.reshape(-1)
    if out.numel() != features.shape[0]:
        raise VTPruneError(f"the learned scorer returned {out.numel()} scores for {features.shape[0]} tokens")
    return out.float()


def text_relevance(view: VisualView) -> torch.Tensor:
    """[V] mean cosine of each token to the non-visual tokens (zeros if there are none)."""
    if view.text.shape[0] == 0:
        return torch.zeros(view.num_tokens, device=view.features.device)
    return diversity.unit_rows(view.features) @ diversity.unit_rows(view.text).mean(0)


@register_pruner
class MMRPruner(RoundedReferenceCount, Pruner):
    """Importance (per ``importance``) + MMR selection (:func:`vtprune.diversity.mmr`)."""

    config_class = MMRConfig

    def __init__(self, config: MMRConfig) -> None:
        super().__init__(config)
        self.needs = IMPORTANCE_NEEDS.get(config.importance, frozenset())
        self._importance = self._importance_fn(config)

    def _importance_fn(self, config: MMRConfig) -> Callable[[VisualView], torch.Tensor]:
        """The raw importance ``w`` of a view's tokens."""
        if config.importance == "norm":
            return lambda view: view.features.float().norm(dim=-1)
        if config.importance == "text":
            return text_relevance
        if config.importance == "zoo":
            scorer = ZOScorer(config)
            return lambda view: scorer(view.extras, self.generator(view))
        if config.importance == "learned":
            module = load_scorer(config.scorer_path).eval()
            return lambda view: learned_scores(module, view.features)
        fn = attention.cls_attention_scores if config.importance == "cls" else attention.pagerank_scores
        return lambda view: fn(view, self)

    def vision_layers(self, full_attention_layers: list[int], num_layers: int) -> list[int]:
        if VISION_QK not in self.needs:
            return []
        return attention.default_vision_layers(full_attention_layers, num_layers)

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        imp = diversity.min_max(self._importance(view).float(), eps=1e-6)
        unit = diversity.unit_rows(view.features)
        picks = diversity.mmr(diversity.on_demand(unit), imp, k, float(self.config.lam))
        return Selection(indices=torch.sort(picks).values)
