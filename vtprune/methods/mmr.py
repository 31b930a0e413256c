"""IDPruner-style Maximal Marginal Relevance (arXiv 2602.13315; docs/algorithms.md, ``mmr``) with a choice of
training-free importance signals, or a learned scorer loaded from a local file.

IDPruner's own importance is a *trained* scorer (VisionSelector); without one, the method here is
"IDPruner-MMR with <importance> importance", not IDPruner itself.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..capture import PROJECTOR, VISION_QK
from ..config import ModeOption, PrunerConfig, check_int, is_number
from ..errors import VTPruneError
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import Pruner
from .divprune import RoundedReferenceCount
from .zero_tprune import pagerank_scores
from .zoo import ZOOptions, ZOScorer

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
        ranks tokens almost exactly like ZO sensitivity (Spearman ≈ 0.99 in our feasibility study) at ~1/(2m)
        of the cost.
      * ``"text"``: mean cosine of each token to the sample's non-visual token states (``VisualView.text``:
        the prompt, question included). Query-aware, O((V+T)·D).
      * ``"zoo"``: ZO projector sensitivity (options ``directions``, ``step``, ``rank``, ``precision`` as for ``zoo``).
      * ``"cls"`` / ``"pagerank"``: vision-encoder [CLS] attention (:func:`vtprune.ops.cls_attention_scores`) /
        Zero-TPrune's weighted PageRank (:func:`vtprune.methods.zero_tprune.pagerank_scores`).
      * ``"learned"``: a scorer loaded from ``scorer_path``.
    lam:         λ, importance vs. diversity trade-off in [0, 1] (0.5, the paper's best).
    scorer_path: a scorer mapping features [V, D] -> raw scores [V] (logits, as the reference code uses them),
                 stored as tensors of the :class:`MLPScorer` architecture (a safetensors file, or a
                 ``torch.save``d state dict read with ``weights_only=True``): loading never runs code from it.
    trust_scorer_code: also accept a TorchScript scorer (any architecture). Loading one runs the file's code,
                 so it must be asked for; pickled ``nn.Module`` objects are never loaded.
    parallel_k:  tokens taken per greedy step (the reference's ``parallel_k``, default 1): the first step takes
                 the ``parallel_k`` most important tokens, every later step the ``parallel_k`` best MMR scores,
                 and the redundancy term is updated once per step. 1 = one pick per step.
    mode:        ``"reference"`` uses IDPruner's count rule ``k = round(ρ·V)`` (Python rounding, ≥ 1); the
                 selection itself (fp32 cosine, ``parallel_k`` picks per step) is the same in both modes.
    """

    name = "mmr"
    importance: str = "norm"
    lam: float = 0.5
    scorer_path: str | None = None
    trust_scorer_code: bool = False
    parallel_k: int = 1

    def validate(self) -> None:
        super().validate()
        self.validate_zo()
        self.validate_mode()
        check_int(self, "parallel_k", 1, "tokens per MMR step")
        if self.importance not in IMPORTANCES:
            raise VTPruneError(f"importance={self.importance!r}: expected one of {IMPORTANCES}")
        if not is_number(self.lam) or not 0 <= self.lam <= 1:
            raise VTPruneError(f"lam={self.lam!r}: expected a float in [0, 1]")
        if (self.importance == "learned") != (self.scorer_path is not None):
            raise VTPruneError(f"scorer_path={self.scorer_path!r}: give a scorer file exactly when "
                               f"importance='learned' (importance is {self.importance!r})")
        if self.scorer_path is not None:
            if not isinstance(self.scorer_path, (str, os.PathLike)):
                raise VTPruneError(f"scorer_path={self.scorer_path!r}: expected the path of a scorer file")
            if not os.path.isfile(self.scorer_path):
                raise VTPruneError(f"scorer_path={self.scorer_path!r}: no such file")
            self.scorer_path = os.fspath(self.scorer_path)
        if not isinstance(self.trust_scorer_code, bool):
            raise VTPruneError(f"trust_scorer_code={self.trust_scorer_code!r}: expected true or false")
        if self.trust_scorer_code and self.scorer_path is None:
            raise VTPruneError("trust_scorer_code=True is only meaningful with importance='learned' and a "
                               "TorchScript scorer_path")


class MLPScorer(nn.Module):
    """The architecture of a scorer stored as tensors: linear layers ``layers.{i}.weight`` [out, in] (and
    optional ``layers.{i}.bias`` [out]), i = 0..n-1, GELU between consecutive layers; the last layer has
    out = 1, its output is each token's raw score. Runs in the dtype of the stored tensors."""

    def __init__(self, state: dict[str, torch.Tensor], path: str) -> None:
        super().__init__()
        layers = []
        while f"layers.{len(layers)}.weight" in state:
            i = len(layers)
            weight, bias = state[f"layers.{i}.weight"], state.get(f"layers.{i}.bias")
            if weight.dim() != 2:
                raise VTPruneError(f"scorer_path={path!r}: layers.{i}.weight has shape {list(weight.shape)}, "
                                   "expected [out, in]")
            if i and weight.shape[1] != layers[-1].out_features:
                raise VTPruneError(f"scorer_path={path!r}: layers.{i}.weight has shape {list(weight.shape)}, expected "
                                   f"[out, {layers[-1].out_features}] (layer {i - 1}'s output)")
            if bias is not None and bias.shape != weight.shape[:1]:
                raise VTPruneError(f"scorer_path={path!r}: layers.{i}.bias has shape {list(bias.shape)}, "
                                   f"expected [{weight.shape[0]}]")
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            layer.load_state_dict({"weight": weight} | ({} if bias is None else {"bias": bias}), assign=True)
            layers.append(layer)
        known = {f"layers.{i}.{p}" for i in range(len(layers)) for p in ("weight", "bias")}
        unexpected = sorted(set(state) - known)
        if not layers or unexpected:
            missing = f"; layers.{len(layers)}.weight is missing" if any(k.startswith("layers.") for k in unexpected) \
                else ""
            raise VTPruneError(f"scorer_path={path!r}: unexpected tensor(s) {unexpected}{missing}; expected "
                               "layers.0.weight, layers.0.bias, layers.1.weight, ... (see MLPScorer)")
        if layers[-1].out_features != 1:
            raise VTPruneError(f"scorer_path={path!r}: the last layer must output 1 score per token, it outputs "
                               f"{layers[-1].out_features}")
        self.layers = nn.ModuleList(layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.layers[0].in_features:
            raise VTPruneError(f"the learned scorer expects {self.layers[0].in_features} features per token, got "
                               f"{features.shape[-1]}: it was trained for another model or site")
        x = self.layers[0](features)
        for layer in self.layers[1:]:
            x = layer(F.gelu(x))
        return x.squeeze(-1)


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip file with a ``code/`` folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of a ``torch.save``d state dict, read without running code."""
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except safetensors.SafetensorError:
        pass
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise VTPruneError(f"scorer_path={path!r} is neither a safetensors file nor a state dict that "
                           f"torch.load(weights_only=True) reads ({type(exc).__name__}); save the scorer's "
                           "tensors in the MLPScorer layout, or a TorchScript scorer with trust_scorer_code=True"
                           ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise VTPruneError(f"scorer_path={path!r} holds a {type(state).__name__}, not a dict of tensors")
    return state


def load_scorer(path: str, trust_code: bool) -> nn.Module:
    """The scorer stored at ``path``, on the CPU: tensors into :class:`MLPScorer`, or TorchScript when
    ``trust_code`` allows running the file's code."""
    if is_torchscript(path):
        if not trust_code:
            raise VTPruneError(f"scorer_path={path!r} is a TorchScript archive, which runs its own code when "
                               "loaded; pass trust_scorer_code=True if you trust it")
        return torch.jit.load(path, map_location="cpu")
    return MLPScorer(read_tensors(path), path)


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
    return ops.unit_rows(view.features) @ ops.unit_rows(view.text).mean(0)


@register_pruner
class MMRPruner(RoundedReferenceCount, Pruner):
    """Importance (per ``importance``) + MMR selection (:func:`vtprune.ops.mmr`).
    See docs/algorithms.md, section ``mmr``."""

    reads_cls = "importance='cls'"
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
            module = load_scorer(config.scorer_path, config.trust_scorer_code).eval()
            return lambda view: learned_scores(module, view.features)
        if config.importance == "cls":
            return ops.cls_attention_scores
        return lambda view: pagerank_scores(view, config)

    def vision_layers(self, full_attention_layers: list[int], num_layers: int) -> list[int]:
        if VISION_QK not in self.needs:
            return []
        return ops.default_vision_layers(full_attention_layers, num_layers)

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        imp = ops.min_max(self._importance(view).float(), eps=1e-6)
        unit = ops.unit_rows(view.features)
        picks = ops.mmr(ops.on_demand(unit), imp, k, float(self.config.lam), self.config.parallel_k)
        return Selection(indices=torch.sort(picks).values)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``V·D + 2·V·D·k`` with the default ``"norm"`` importance: the feature norms and one similarity column
        per pick. Other importances add their signal's cost (text: ``2·(V+T)·D``; zoo/cls/pagerank: projector or
        encoder work, not counted)."""
        return before * dim + 2 * before * dim * kept
