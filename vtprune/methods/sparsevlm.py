"""SparseVLM (ICML 2025): text raters chosen once from the input embeddings score the visual tokens at several decoder
layers; each cut keeps the best-rated tokens and recycles the best of the deleted ones into a few cluster means."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from ..capture import LLM_QK, LLMQK, LM_INPUT, LMInput, text_after_image
from ..config import ModeOption, PrunerConfig
from ..errors import VTPruneError
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import ScorerPruner

#: the reference's cuts on LLaVA-1.5-7B's 32 layers: it prunes the outputs of layers 2/6/15, i.e. before layers
#: 3/7/16 (vtprune's cut K reads layer K-1's attention and shortens layer K's input)
REFERENCE_LAYERS = (3, 7, 16)
#: the reference's image size (LLaVA-1.5's 576 tokens) its budget table is written for
REFERENCE_V = 576
#: v1.5's ``score.py`` budgets by the paper's label (layer-averaged tokens): the top-k kept after each cut, and the
#: visual tokens that leave each cut with the recycled cluster tokens (k + clusters, see :func:`recycled`)
TABLE: dict[int, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    192: ((300, 200, 110), (309, 204, 113)),
    128: ((303, 110, 36), (312, 117, 39)),
    96: ((238, 48, 26), (249, 55, 27)),
    64: ((66, 30, 17), (82, 32, 18)),
}


def recycled(deleted: int) -> tuple[int, int]:
    """The reference's recycling arithmetic for ``deleted`` tokens: (the top ``⌊0.3·|D|⌋ + 1`` of them that are
    clustered, ``⌊n/10⌋ + 1`` clusters); (0, 0) when nothing is deleted."""
    if deleted <= 0:
        return 0, 0
    n = math.floor(0.3 * deleted) + 1
    return n, n // 10 + 1


def split(total: int, tokens: int) -> int:
    """How many of ``tokens`` a cut leaving ``total`` (recycled included) keeps as they are: the largest k in
    [1, tokens-1] with ``k + clusters(tokens - k) <= total`` (then equal: the sum grows by 0 or 1 per k). When even
    k = 1 overshoots (tiny budgets) the cut keeps ``total`` tokens and recycles none."""
    if total >= tokens:
        return tokens - 1
    for k in range(total - 1, 0, -1):
        if k + recycled(tokens - k)[1] <= total:
            return k
    return total


def default_layers(num_layers: int, allowed: list[int]) -> tuple[int, ...]:
    """The reference's cuts 3/7/16 on decoders of 32 layers or more; on shallower ones the same fractions of the depth,
    ``⌊K·T/32 + 1/2⌋``, each snapped to the nearest allowed layer after the previous cut (the lower on a tie); a cut
    with no layer left after the previous one is dropped (4 layers: 1/2/3; 28 layers: 3/6/14)."""
    if not allowed:
        raise VTPruneError("sparsevlm: this model has no decoder layer it can cut at")
    targets = REFERENCE_LAYERS if num_layers >= 32 else [math.floor(l * num_layers / 32 + 0.5) for l in REFERENCE_LAYERS]
    layers: list[int] = []
    for t in targets:
        free = [a for a in allowed if not layers or a > layers[-1]]
        if free:
            layers.append(min(free, key=lambda a: (abs(a - t), a)))
    return tuple(layers)


@dataclass
class SparseVLMConfig(PrunerConfig, ModeOption):
    """SparseVLM: cuts (default before layers 3/7/16, the reference's "after layers 2/6/15") with v1.5's budget table.

    keep:    the visual tokens that leave the last cut, recycled ones included (default ``113/576``: the paper's
             "192" setting, 309/204/113 of 576; "128" = ``39/576``, "96" = ``27/576``, "64" = ``18/576``). The table
             row whose last count is nearest to keep (an int as a count out of 576) gives the earlier cuts, scaled by
             ``keep / row's last``; cuts that would keep everything are dropped. ``layer=K`` makes one cut at K
             keeping ``keep``; ``schedule=`` gives every cut's budget.
    recycle: recycle deleted tokens (reference default, v1.0/v1.5): a cut leaving t tokens keeps the top k and adds
             ``⌊(⌊0.3(V-k)⌋+1)/10⌋+1`` cluster means of the best deleted ones, k + clusters = t (:func:`split`).
    mode:    ``"clean"`` keeps the original positions; ``"reference"`` renumbers each layer group 0..N-1 from the first
             cut on, decoding from its own cache length, as v1.5 does (1-D RoPE decoders only)."""

    name = "sparsevlm"
    cut_reads_previous_layer = True
    site: str = "layer"
    layer: int | None = None  # None: the default cuts (or ``schedule``) once the model is known
    keep: float | int = 113 / 576
    recycle: bool = True

    def validate(self) -> None:
        deferred = self.schedule is None and self.layer is None
        super().validate()
        self.validate_mode()
        if not isinstance(self.recycle, bool):
            raise VTPruneError(f"recycle={self.recycle!r}: expected True or False")
        if deferred:
            self.layer = None

    @property
    def compact_stages(self) -> bool:
        """``mode="reference"``: v1.5's compact positions (each layer group numbered 0..N-1, decoding from its own
        cache length)."""
        return self.reference

    def default_schedule(self, num_layers: int, allowed: list[int]) -> tuple[tuple[int, float | int], ...] | None:
        if self.layer is not None:  # a single cut at ``layer``
            return None
        layers = default_layers(num_layers, allowed)
        keep = self.keep
        if isinstance(keep, float) and keep == 1.0:
            return ((layers[0], 1.0),)
        share = keep if isinstance(keep, float) else keep / REFERENCE_V
        row = min((r[1 if self.recycle else 0] for r in TABLE.values()),
                  key=lambda r: (abs(r[-1] / REFERENCE_V - share), -r[-1]))
        scale = keep / row[-1]
        if isinstance(keep, float):
            keeps: list[float | int] = [n * scale for n in row[:-1]] + [keep]
        else:
            keeps = [max(1, math.floor(n * scale + 0.5)) for n in row[:-1]] + [keep]
        cuts = list(zip(layers[-len(keeps):], keeps[-len(layers):]))  # a shallow decoder keeps the last cuts
        out = [cuts[-1]]
        for layer, k in reversed(cuts[:-1]):  # only cuts that keep more than the next and less than everything
            if k > out[0][1] and not (isinstance(k, float) and k >= 1.0):
                out.insert(0, (layer, k))
        return tuple(out)


def raters(lm: LMInput) -> torch.Tensor:
    """Which text tokens after the image rate it, as 0/1 weights over them (a mask, not indices: nothing is read from
    the device): ``P = softmax over text of E_v E_tᵀ`` on layer 0's input states, averaged over the visual tokens;
    raters are the text tokens above the mean of P (all of them when P is flat). Float32."""
    after = lm.text[text_after_image(lm)]
    if after.numel() == 0:
        raise VTPruneError("sparsevlm: no text token follows the image, so there are no raters to score it; put the "
                           "question after the image")
    e_v, e_t = lm.states[lm.image].float(), lm.states[after].float()
    relevance = (e_v @ e_t.T).softmax(-1).mean(0)
    chosen = relevance > relevance.mean()
    return torch.where(chosen.any(), chosen, torch.ones_like(chosen)).float()


def rater_scores(qk: LLMQK, weights: torch.Tensor) -> torch.Tensor:
    """[V] mean over raters and heads of layer K-1's causal attention probabilities (softmax over all keys) from the
    raters (``weights``: 1 for a rater among the text tokens after the image) to each of the image's tokens still
    present."""
    after = qk.text[text_after_image(qk)]
    probs = ops.causal_attention_rows(qk.query[:, after], qk.key, after, qk.scaling, qk.window)
    return (probs[:, :, qk.image].mean(0) * (weights / weights.sum())[:, None]).sum(0)


@register_pruner
class SparseVLMPruner(ScorerPruner):
    """SparseVLM (v1.5): raters = the text tokens after the image most relevant to it by layer-0 dot products; at each
    cut, image tokens scored by the raters' mean attention in layer K-1 (their rows only, recomputed from captured q/k,
    so SDPA/FlashAttention keep running); the top ones stay and, with ``recycle``, the best deleted ones are clustered
    (DPC-KNN) into plain means that take their cluster centre's slot and position (the reference appends them after
    the kept tokens). Multi-stage through the in-LLM site's schedule. See docs/algorithms.md, section ``sparsevlm``."""

    config_class = SparseVLMConfig
    sites = ("layer",)
    needs = frozenset({LLM_QK, LM_INPUT})

    def score(self, view: VisualView) -> torch.Tensor:
        qk, lm = view.extras["llm_qk"], view.extras["lm_input"]
        at_cut, at_input = (text_after_image(s).numel() for s in (qk, lm))  # host counts where the site read them
        if at_cut != at_input:
            raise VTPruneError(f"sparsevlm: image {view.image} has {at_input} text tokens after it at layer 0 but "
                               f"{at_cut} at the cut at layer {view.layer}; its raters cannot be found again (text "
                               "inside the image's span?)")
        return rater_scores(qk, raters(lm))

    def select(self, view: VisualView, k: int) -> Selection:
        scores = self.score(view)
        tokens = view.num_tokens
        kept = split(k, tokens) if self.config.recycle else k
        sel = ops.top_k(scores, kept)
        if kept == k:
            return sel
        deleted = torch.ones(tokens, dtype=torch.bool, device=scores.device)
        deleted[sel.indices] = False
        candidates = torch.nonzero_static(deleted, size=tokens - kept).flatten()  # top_k's kept are distinct
        n, clusters = recycled(tokens - kept)
        best = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices[:n]]
        centres, assign = ops.dpc_knn(view.features[best], clusters, self.generator(view))
        hosts = best[centres]
        indices, order = torch.sort(torch.cat([sel.indices, hosts]))
        states = torch.cat([view.features[sel.indices], ops.cluster_means(view.features[best], assign, clusters)])
        return Selection(indices=indices, embeddings=states[order])

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """Per cut: ``2·R·V·D`` for R = 16 raters' rows against the V image keys (the rater count depends on the
        prompt; 16 is assumed), plus recycling's DPC-KNN distances ``3·n²·D`` on the n = ⌊0.3·(V - kept)⌋ + 1
        clustered tokens. The raters' one-off ``2·V·T·D`` and text columns are not counted."""
        n = recycled(before - kept)[0]
        return 2 * 16 * before * dim + 3 * n * n * dim
