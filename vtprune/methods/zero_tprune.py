"""Zero-TPrune (CVPR 2024) on a VLM's vision-encoder attention graph: weighted PageRank importance plus an
importance-guided similarity stage, run in the paper's I' -> S -> I order. Registered as ``"zero_tprune"``
with the alias ``"pagerank"`` (its name before issue 16); timm ViTs are patched by :mod:`vtprune.timm_patch`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..capture import VISION_QK
from ..config import PrunerConfig, is_number
from ..errors import VTPruneError
from ..ops import (
    AttentionGraph,
    ReadsEncoderAttention,
    best_match,
    informative_heads,
    pooled,
    reading_graphs,
    rms_heads,
    token_keys,
    top_k,
    weighted_pagerank,
)
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import Pruner

#: the head filter (VHF): keep heads whose score variance (scores rescaled to mean 1) is in this range
HEAD_VARIANCE = (0.01, 0.7)


@dataclass
class ZeroTPruneConfig(PrunerConfig):
    """wpr_iters: power iterations (None: the paper's depth rule, which gives 1 for the deep encoder layers
    a VLM reads and 30 / 5 / 1 for early / middle / last-three ViT blocks); wpr_tol: stop early once the L1
    change is below it (e.g. ``wpr_iters=50, wpr_tol=1e-6`` iterates to convergence); head_variance: the
    head filter's bounds on scores rescaled to mean 1 (None disables it); similarity_share: fraction of the
    removed tokens the similarity stage removes (0 disables it); vit_blocks: timm ViTs only, the blocks after
    which tokens are pruned (None: depth//4, depth//2, 3·depth//4)."""

    name = "zero_tprune"
    wpr_iters: int | None = None
    wpr_tol: float = 0.0
    head_variance: tuple[float, float] | None = HEAD_VARIANCE
    similarity_share: float = 0.5
    vit_blocks: tuple[int, ...] | None = None

    def validate(self) -> None:
        super().validate()
        if self.wpr_iters is not None and (isinstance(self.wpr_iters, bool) or not isinstance(self.wpr_iters, int)
                                           or self.wpr_iters < 1):
            raise VTPruneError(f"wpr_iters={self.wpr_iters!r}: expected None or an int >= 1")
        if not is_number(self.wpr_tol) or not self.wpr_tol >= 0:
            raise VTPruneError(f"wpr_tol={self.wpr_tol!r}: expected a number >= 0")
        if self.head_variance is not None:
            hv = tuple(self.head_variance) if isinstance(self.head_variance, (tuple, list)) else ()
            if len(hv) != 2 or not all(is_number(v) for v in hv) or not 0 <= hv[0] <= hv[1]:
                raise VTPruneError(f"head_variance={self.head_variance!r}: expected None or (low, high), "
                                   "0 <= low <= high")
            self.head_variance = hv
        if not is_number(self.similarity_share) or not 0.0 <= self.similarity_share <= 1.0:
            raise VTPruneError(f"similarity_share={self.similarity_share!r}: expected a fraction in [0, 1]")
        if self.vit_blocks is not None:
            blocks = tuple(self.vit_blocks) if isinstance(self.vit_blocks, (tuple, list)) else ()
            if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
                raise VTPruneError(f"vit_blocks={self.vit_blocks!r}: expected None or block indices >= 0")
            self.vit_blocks = tuple(sorted(set(blocks)))


def pagerank_init(heads: int, nodes: int, has_cls: bool, device: torch.device) -> torch.Tensor:
    """Uniform start ("Zero-TPrune-uni"); with a [CLS] node 0 it starts at √N times any other node.
    Normalised to sum 1 per head."""
    s = torch.ones(heads, nodes, device=device)
    if has_cls:
        s[:, 0] = math.sqrt(nodes)
    return s / s.sum(-1, keepdim=True)

@dataclass(frozen=True)
class WPROptions:
    """Weighted-PageRank settings: power iterations, early-stop L1 tolerance, head-variance bounds (None
    disables the head filter)."""

    iters: int = 1
    tol: float = 0.0
    head_variance: tuple[float, float] | None = HEAD_VARIANCE

    @classmethod
    def of(cls, config: Any, iters: int = 1) -> "WPROptions":
        """Options from a config's ``wpr_iters``/``wpr_tol``/``head_variance`` fields where it has them
        (``wpr_iters=None`` -> ``iters``), else the defaults."""
        given = getattr(config, "wpr_iters", None)
        return cls(iters=iters if given is None else given, tol=getattr(config, "wpr_tol", 0.0),
                   head_variance=getattr(config, "head_variance", HEAD_VARIANCE))


def wpr_node_scores(g: AttentionGraph, options: WPROptions) -> torch.Tensor:
    """Zero-TPrune's I-stage scores of every node: weighted PageRank per head, head filter (on the
    non-[CLS] nodes), root-mean-square over the kept heads. [N]."""
    init = pagerank_init(g.heads, g.nodes, g.has_cls, g.query.device)
    scores = weighted_pagerank(g.query, g.key, g.scaling, init, options.iters, options.tol)
    heads = informative_heads(scores[:, int(g.has_cls):], options.head_variance)
    return rms_heads(scores, heads)


def wpr_iterations(layer: int, depth: int) -> int:
    """Zero-TPrune's iteration count by depth: 1 in the last three layers, 30 in the first three, 5 between."""
    if layer >= depth - 3:
        return 1
    return 30 if layer < 3 else 5


def pagerank_scores(view: VisualView, config: Any) -> torch.Tensor:
    """[V] weighted-PageRank importance (I-stage on the whole encoder graph of the layer
    :func:`vtprune.ops.reading_graphs` reads), pooled to visual tokens. Options come from ``config`` where it
    has ``wpr_iters``/``wpr_tol``/``head_variance`` (default: 1 iteration, as the paper's rule gives for these
    deep layers; VHF bounds [0.01, 0.7]); IDPruner-MMR's ``importance="pagerank"``."""
    options = WPROptions.of(config)
    return pooled(reading_graphs(view), view.num_tokens, lambda g: wpr_node_scores(g, options))


def fed_tokens(graphs: list[AttentionGraph], size: int) -> torch.Tensor:
    """[size] bool: tokens fed by at least one graph node (LLaVA-NeXT newline tokens are not)."""
    fed = torch.zeros(size, dtype=torch.bool, device=graphs[0].query.device)
    for g in graphs:
        fed[g.token[g.token >= 0]] = True
    return fed


def similarity_stage(graphs: list[AttentionGraph], size: int, fed: torch.Tensor, drop: int,
                     options: WPROptions) -> torch.Tensor:
    """Zero-TPrune's I' and S stages: rank the fed tokens by one weighted-PageRank iteration (I'), split
    them into the less important half A and the rest B ("Sequential-U"), match every a in A to its most
    key-similar b in B (head-mean keys, cosine) and drop the ``drop`` best-matched a (capped by |A|).
    Returns the dropped tokens as a bool mask [size]."""
    removed = torch.zeros(size, dtype=torch.bool, device=fed.device)
    candidates = fed.nonzero().flatten()
    drop = min(drop, candidates.numel() // 2)
    if drop <= 0:
        return removed
    pre = WPROptions(iters=1, head_variance=options.head_variance)
    importance = pooled(graphs, size, lambda g: wpr_node_scores(g, pre))[candidates]
    ranked = candidates[torch.sort(importance, stable=True).indices]
    half = ranked.numel() // 2
    a, b = ranked[:half], ranked[half:]
    keys = token_keys(graphs, size)
    sim = best_match(keys[a], keys[b])[0]
    removed[a[torch.sort(sim, descending=True, stable=True).indices[:drop]]] = True
    return removed


def zero_tprune(graphs: list[AttentionGraph], size: int, k: int, options: WPROptions,
                similarity_share: float) -> Selection:
    """Keep k of ``size`` tokens fed by ``graphs``: the similarity stage drops ``⌊share·(size-k)⌋`` tokens,
    then the I-stage (weighted PageRank on the survivors' subgraph, attention renormalised over it, head
    filter, RMS over heads) keeps the top k of the rest. Tokens no node feeds score 0 (kept last)."""
    fed = fed_tokens(graphs, size)
    removed = similarity_stage(graphs, size, fed, math.floor(similarity_share * (size - k)), options)
    survivors = [g.subgraph((g.token < 0) | ~removed[g.token.clamp(min=0)]) for g in graphs]
    scores = pooled(survivors, size, lambda g: wpr_node_scores(g, options))
    return top_k(scores.masked_fill(removed, float("-inf")), k)


@register_pruner
class ZeroTPrunePruner(ReadsEncoderAttention, Pruner):
    """Zero-TPrune adapted to a VLM, pre-LLM, on the vision-encoder graph of the layer whose
    output the projector reads (CLIP: penultimate layer; Qwen: last full-attention block). Weighted PageRank
    ``s ← Aᵀ s`` per head, streamed over query blocks from captured q/k (never ``output_attentions``);
    [CLS] starts at √N times the other nodes, encoders without [CLS] start uniform; head filter on scores
    rescaled to mean 1 (the paper's bounds are meaningless on scores summing to 1); RMS over kept heads.
    Order I' -> S -> I, ``⌊similarity_share·(V-k)⌋`` tokens removed by the similarity stage (a harness
    choice: the paper does not fix the split), the rest by the I-stage on the survivors' subgraph.

    Node scores reach visual tokens summed over their patches (Qwen: a 2x2 group; keys averaged over the
    group). LLaVA-NeXT: every view (base + crops) is its own graph and all views are ranked together;
    newline tokens, fed by no patch, are kept only when the budget exceeds the other tokens. Clean budget;
    kept tokens in original order. On timm ViTs see :mod:`vtprune.timm_patch`.
    See docs/algorithms.md, section ``zero_tprune``."""

    config_class = ZeroTPruneConfig
    aliases = ("pagerank",)
    sites = ("pre_llm",)
    needs = frozenset({VISION_QK})

    def select(self, view: VisualView, k: int) -> Selection:
        options = WPROptions.of(self.config)
        return zero_tprune(reading_graphs(view), view.num_tokens, k, options, self.config.similarity_share)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> None:
        """``None``: the cost is the weighted PageRank over the encoder's attention graph (``≈ 4·H·N²·d``
        per iteration and view), in encoder dims the formula does not see."""
        return None


#: the config's name before issue 16, kept for imports
PagerankConfig = ZeroTPruneConfig
