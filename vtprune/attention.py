"""Attention-derived token scores, recomputed from captured q/k (the model keeps running SDPA/FlashAttention).

Only the rows a scorer needs are materialised: a single query row (FastV, [CLS] attention) costs
O(H·n·d); whole-graph quantities (received attention, weighted PageRank) stream query blocks of at most
:data:`CHUNK_ELEMENTS` probabilities, since they only need ``Aᵀ s`` and never the full ``A``.

Vision-encoder signals come as ``view.extras["vision_qk"] = {layer: [VisionQK per encoder view]}``.
Each view is an :class:`AttentionGraph` whose nodes are its [CLS] token (CLIP) and patches; node scores
reach the image's visual tokens through ``token_of_patch`` (summed: Qwen's 2x2 merge groups; -1 = none).
Tokens fed by no patch (LLaVA-NeXT's row-newline tokens) score 0, below every attention score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .capture import VisionQK
from .errors import VTPruneError
from .view import VisualView

#: the most attention probabilities held at once (64 MiB in float32)
CHUNK_ELEMENTS = 1 << 24
#: Zero-TPrune's head filter (VHF): keep heads whose score variance (scores rescaled to mean 1) is in this range
HEAD_VARIANCE = (0.01, 0.7)


# ---- attention rows and graphs ---------------------------------------------------------------------------
def expand_kv(key: torch.Tensor, heads: int) -> torch.Tensor:
    """[H_kv, n, d] -> [heads, n, d]: grouped-query keys repeated for the query heads that share them."""
    return key if key.shape[0] == heads else key.repeat_interleave(heads // key.shape[0], dim=0)


def attention_rows(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of queries [H, m, d] over keys [H_kv, n, d], no mask: [H, m, n] in float32."""
    key = expand_kv(key, query.shape[0]).float()
    return (query.float() @ key.transpose(-1, -2) * scaling).softmax(-1)


def block_rows(cols: int, heads: int, budget: int) -> int:
    """Query rows per block so that a block's [heads, rows, cols] probabilities stay within ``budget``."""
    return max(1, budget // max(1, heads * cols))


def attention_transpose_apply(query: torch.Tensor, key: torch.Tensor, scaling: float, weights: torch.Tensor,
                              budget: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Per head, ``Aᵀ w``: ``out[h, j] = Σ_q weights[h, q]·A_h[q, j]`` for A = softmax(q kᵀ·scaling),
    streamed over query blocks so at most ``budget`` probabilities exist at once. [H, n]."""
    heads, rows = query.shape[:2]
    key = expand_kv(key, heads).float()  # converted once, not per block
    out = torch.zeros(heads, key.shape[1], dtype=torch.float32, device=query.device)
    step = block_rows(key.shape[1], heads, budget)
    for s in range(0, rows, step):
        probs = attention_rows(query[:, s:s + step], key, scaling)
        out += (weights[:, s:s + step, None].float() * probs).sum(1)
    return out


def power_iteration(step: Callable[[torch.Tensor], torch.Tensor], init: torch.Tensor, iters: int,
                    tol: float = 0.0) -> torch.Tensor:
    """Apply ``step`` ``iters`` times from ``init``, stopping early once every row's L1 change is < tol."""
    s = init
    for _ in range(iters):
        nxt = step(s)
        done = tol > 0 and float((nxt - s).abs().sum(-1).max()) < tol
        s = nxt
        if done:
            break
    return s


def weighted_pagerank(query: torch.Tensor, key: torch.Tensor, scaling: float, init: torch.Tensor, iters: int,
                      tol: float = 0.0, budget: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Zero-TPrune's weighted PageRank per head: ``s ← Aᵀ s`` (each token's importance is the attention it
    receives, weighted by the importance of who attends). Row-stochastic A preserves the mass. [H, n]."""
    return power_iteration(lambda s: attention_transpose_apply(query, key, scaling, s, budget), init, iters, tol)


def pagerank_init(heads: int, nodes: int, has_cls: bool, device: torch.device) -> torch.Tensor:
    """Uniform start ("Zero-TPrune-uni"); with a [CLS] node 0 it starts at √N times any other node.
    Normalised to sum 1 per head."""
    s = torch.ones(heads, nodes, device=device)
    if has_cls:
        s[:, 0] = math.sqrt(nodes)
    return s / s.sum(-1, keepdim=True)


def informative_heads(scores: torch.Tensor, bounds: tuple[float, float] | None) -> torch.Tensor:
    """Zero-TPrune's variance-based head filter (VHF) on [H, n] scores rescaled to mean 1 per head (the
    scale on which the paper's [0.01, 0.7] default is meaningful). All heads when none passes or no bounds."""
    keep = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    if bounds is None:
        return keep
    var = (scores / scores.mean(-1, keepdim=True)).var(-1, unbiased=False)
    inside = (var >= bounds[0]) & (var <= bounds[1])
    return inside if bool(inside.any()) else keep


def rms_heads(scores: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Emphasizing-informative-region aggregation: root mean square over the kept heads, [H, n] -> [n]."""
    return scores[heads].square().mean(0).sqrt()


@dataclass
class AttentionGraph:
    """One encoder view's self-attention, given by its q/k [H, N, d]. ``token`` [N]: the visual token each
    node feeds (-1: none, e.g. [CLS]); ``has_cls``: node 0 is a [CLS] token."""

    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    token: torch.Tensor
    has_cls: bool

    @property
    def heads(self) -> int:
        return self.query.shape[0]

    @property
    def nodes(self) -> int:
        return self.query.shape[1]

    def subgraph(self, nodes: torch.Tensor) -> "AttentionGraph":
        """The graph on a node subset (bool [N], node 0 kept when it is [CLS]): softmax renormalised over it."""
        return AttentionGraph(self.query[:, nodes], self.key[:, nodes], self.scaling, self.token[nodes], self.has_cls)

    def pool(self, node_scores: torch.Tensor, size: int) -> torch.Tensor:
        """Sum node scores [N] into their visual tokens: [size] (nodes feeding no token are ignored)."""
        ok = self.token >= 0
        out = torch.zeros(size, dtype=node_scores.dtype, device=node_scores.device)
        return out.index_add_(0, self.token[ok], node_scores[ok])

    def token_keys(self, size: int) -> torch.Tensor:
        """Head-mean key of every visual token, averaged over the nodes that feed it: [size, d]."""
        keys = self.key.float().mean(0)
        ok = self.token >= 0
        total = torch.zeros(size, keys.shape[-1], device=keys.device).index_add_(0, self.token[ok], keys[ok])
        count = torch.zeros(size, device=keys.device).index_add_(0, self.token[ok], torch.ones_like(keys[ok, 0]))
        return total / count.clamp(min=1)[:, None]


def graph_of(vq: VisionQK) -> AttentionGraph:
    """A captured encoder view as a graph ([CLS] first when the encoder has one)."""
    if vq.cls_query is None:
        return AttentionGraph(vq.query, vq.key, vq.scaling, vq.token_of_patch, has_cls=False)
    query = torch.cat([vq.cls_query[:, None], vq.query], 1)
    key = torch.cat([vq.cls_key[:, None], vq.key], 1)
    token = torch.cat([vq.token_of_patch.new_full((1,), -1), vq.token_of_patch])
    return AttentionGraph(query, key, vq.scaling, token, has_cls=True)


def pooled(graphs: list[AttentionGraph], size: int, node_scores: Callable[[AttentionGraph], torch.Tensor]
           ) -> torch.Tensor:
    """Visual-token scores [size]: ``node_scores`` of every graph, summed into the tokens."""
    out = torch.zeros(size, device=graphs[0].query.device)
    for g in graphs:
        out += g.pool(node_scores(g), size)
    return out


def token_keys(graphs: list[AttentionGraph], size: int) -> torch.Tensor:
    """Head-mean keys of the visual tokens over all views (each token is fed by one view only): [size, d]."""
    return sum(g.token_keys(size) for g in graphs)


def best_match(x: torch.Tensor, y: torch.Tensor, budget: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of x [m, d], the cosine similarity to and index of its most similar row of y [p, d]
    (lowest index on ties), in row blocks of at most ``budget`` similarities."""
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    step = block_rows(y.shape[0], 1, budget)
    parts = [(x[s:s + step] @ y.T).max(-1) for s in range(0, x.shape[0], step)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


# ---- node scores -------------------------------------------------------------------------------------------
def cls_attention(g: AttentionGraph) -> torch.Tensor:
    """Head-mean attention the [CLS] query pays every node (the [CLS] node's own entry included): [N]."""
    return attention_rows(g.query[:, :1], g.key, g.scaling)[:, 0].mean(0)


def received_attention(g: AttentionGraph, budget: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Head-mean attention each node receives, summed over all queries: [N]. The score for encoders
    without [CLS] (Qwen), and N times one PageRank iteration from a uniform start."""
    ones = torch.ones(g.heads, g.nodes, device=g.query.device)
    return attention_transpose_apply(g.query, g.key, g.scaling, ones, budget).mean(0)


def cls_or_received(g: AttentionGraph) -> torch.Tensor:
    """[CLS] attention where the encoder has a [CLS] token, else received attention."""
    return cls_attention(g) if g.has_cls else received_attention(g)


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


# ---- which captured encoder layer to read ------------------------------------------------------------------
def default_vision_layers(full_attention_layers: list[int], num_layers: int) -> list[int]:
    """The encoder layers the [CLS]/PageRank scorers read: the penultimate layer (CLIP: the layer whose
    output LLaVA feeds its projector) and the last full-attention block (encoders without [CLS]: Qwen's
    merger reads the last block). Which of the two is used is decided from the captured signals: [CLS]
    encoders read the deeper-but-one captured layer, others the deepest (see :func:`layer_roles`)."""
    return sorted({max(num_layers - 2, 0), full_attention_layers[-1]})


class ReadsEncoderAttention:
    """Pruner mixin: capture the layers :func:`cls_attention_scores` and :func:`pagerank_scores` read."""

    def vision_layers(self, full_attention_layers: list[int], num_layers: int) -> list[int]:
        return default_vision_layers(full_attention_layers, num_layers)


def captured_layers(view: VisualView) -> dict[int, list[VisionQK]]:
    """The vision q/k captured for ``view`` (the pruner must declare ``"vision_qk"`` in ``needs``)."""
    captured = view.extras.get("vision_qk")
    if not captured:
        raise VTPruneError("this scorer needs vision-encoder q/k: declare 'vision_qk' in the pruner's needs")
    return captured


def layer_roles(captured: dict[int, list[VisionQK]]) -> tuple[list[int], int]:
    """(layers read for [CLS] attention, the last full-attention block), from captured layers that include
    the last full-attention block as the deepest one (:func:`default_vision_layers` and the VTC-CLS layer
    range both do). For CLIP that block is the last layer, which LLaVA's features never pass through."""
    layers = sorted(captured)
    return (layers[:-1] or layers), layers[-1]


def has_cls(captured: dict[int, list[VisionQK]]) -> bool:
    """Whether the captured encoder has a [CLS] token (CLIP) or not (Qwen)."""
    return next(iter(captured.values()))[0].cls_query is not None


def reading_graphs(view: VisualView) -> list[AttentionGraph]:
    """The graphs of the layer the single-layer scorers read: the penultimate layer for [CLS] encoders,
    the last full-attention block otherwise."""
    captured = captured_layers(view)
    cls_layers, last_full = layer_roles(captured)
    layer = cls_layers[-1] if has_cls(captured) else last_full
    return [graph_of(vq) for vq in captured[layer]]


# ---- the scorer contract shared with other pruners --------------------------------------------------------
def cls_attention_scores(view: VisualView, pruner: Any) -> torch.Tensor:
    """[V] head-mean [CLS] attention of each visual token (CLIP, penultimate layer); for encoders without
    [CLS] (Qwen) the head-mean attention received from all patches in the last full-attention block,
    summed over each token's 2x2 merge group. ``pruner`` is the caller (no options are read)."""
    return pooled(reading_graphs(view), view.num_tokens, cls_or_received)


def pagerank_scores(view: VisualView, pruner: Any) -> torch.Tensor:
    """[V] Zero-TPrune weighted-PageRank importance (I-stage on the whole encoder graph of the layer
    :func:`cls_attention_scores` reads), pooled to visual tokens. Options come from the pruner's config
    where it has ``wpr_iters``/``wpr_tol``/``head_variance`` (default: 1 iteration, as the paper's rule
    gives for these deep layers; VHF bounds [0.01, 0.7])."""
    options = WPROptions.of(pruner.config)
    return pooled(reading_graphs(view), view.num_tokens, lambda g: wpr_node_scores(g, options))


# ---- decoder-layer attention -------------------------------------------------------------------------------
def last_token_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Head-mean attention of the last query (the last prompt token) over all n keys: [n]. No mask is
    needed: the last token attends to every earlier one."""
    return attention_rows(query[:, -1:], key, scaling)[:, 0].mean(0)


def key_l1_norms(key: torch.Tensor) -> torch.Tensor:
    """L1 norm of each token's key with heads concatenated, [H_kv, n, d] -> [n] (GQA repetition would
    only rescale it)."""
    return key.float().abs().sum((0, 2))
