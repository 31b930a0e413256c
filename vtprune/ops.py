"""Shared tensor building blocks of the pruning methods: pure functions on tensors, no model and no config.

* selection: :func:`top_k`, :func:`lattice`, :func:`split_budget`, :func:`adaptive_pool`;
* greedy diversity (max-min / k-center, MMR, SADS): grow a set P one token per step, keeping for every token its
  largest cosine similarity to P (``maxsim``), updated from the newly picked token's similarity column only:
  O(V) work per step given the column (O(V·D) when computed on demand), O(k·V) overall, no host
  synchronisation in the loop. A step picks the argmax of a method-specific score of ``maxsim``; ties go to the
  lowest index, picked tokens are masked out. Results are in pick order; methods sort them. Over a precomputed
  matrix on a GPU the whole loop is one Triton launch with the same picks (:mod:`vtprune.kernels`);
* DPC-KNN clustering (:func:`dpc_knn`, SparseVLM's token recycling) and plain cluster means;
* attention recomputed from captured q/k (the model keeps running SDPA/FlashAttention): only the rows a method
  needs are materialised; whole-graph quantities (received attention, weighted PageRank) stream query blocks of
  at most :data:`CHUNK_ELEMENTS` probabilities, since they only need ``Aᵀ s``. Vision-encoder signals come as
  ``view.extras["vision_qk"] = {layer: [VisionQK per encoder view]}``; each view is an :class:`AttentionGraph`
  whose nodes are its [CLS] token (CLIP) and patches; node scores reach the image's visual tokens through
  ``token_of_patch`` (summed: Qwen's 2x2 merge groups; -1 = none). Tokens fed by no patch (LLaVA-NeXT's
  row-newline tokens) score 0, below every attention score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels
from .capture import VisionQK
from .errors import VTPruneError
from .view import ImageLayout, Selection, VisualView

#: the similarity of every token to token ``j`` (a 0-d long tensor), shape [V]
SimColumn = Callable[[torch.Tensor], torch.Tensor]
#: a step's score of every token, from its running max similarity to the picked set
StepScore = Callable[[torch.Tensor], torch.Tensor]
#: the most attention probabilities held at once (64 MiB in float32)
CHUNK_ELEMENTS = 1 << 24
#: probabilities per block of the streamed received-attention product on CPU: 16 MB (364 query rows of one head at
#: Qwen2.5-VL's 11,520 patches); blocks of 8 to 128 MB ran within 7 % of it (docs/benchmarks.md)
ATTENTION_BLOCK = 1 << 22


# ---- selection --------------------------------------------------------------------------------------------
def top_k(scores: torch.Tensor, k: int) -> Selection:
    """The k highest scores (lowest index first on ties), returned in original order."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return Selection(indices=torch.sort(order).values)


def lattice(num_tokens: int, k: int, device: torch.device | str = "cpu") -> Selection:
    """k indices evenly spread over 0..V-1 in raster order: ``round(linspace(0, V-1, k))``."""
    if k == 1:
        return Selection(indices=torch.tensor([(num_tokens - 1) // 2], device=device))
    idx = torch.linspace(0, num_tokens - 1, k, device=device, dtype=torch.float64).round().long()
    return Selection(indices=idx)


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """Split k over parts proportionally to ``sizes`` (largest remainder), never above a part's size."""
    total = sum(sizes)
    raw = [k * s / total for s in sizes]
    out = [min(math.floor(r), s) for r, s in zip(raw, sizes)]
    for i in sorted(range(len(sizes)), key=lambda i: raw[i] - out[i], reverse=True):
        if sum(out) >= k:
            break
        if out[i] < sizes[i]:
            out[i] += 1
    return out


def pooled_grid(rows: int, cols: int, k: int) -> tuple[int, int]:
    """An output grid (r, c) with r*c >= k, r <= rows, c <= cols, aspect close to the input's."""
    r = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    c = min(cols, math.ceil(k / r))
    r = min(rows, math.ceil(k / c))
    return r, c


def adaptive_pool(features: torch.Tensor, layout: ImageLayout, k: int) -> Selection:
    """Average-pool each grid segment to a smaller grid (PyTorch adaptive-pooling windows) so that exactly
    k tokens remain. Each pooled token takes the place (and position id) of its window's top-left token.
    The budget is split over segments by size; when a pooled grid has more than its share of cells, cells
    are dropped evenly in raster order. Newline tokens (LLaVA-NeXT) are kept only when k exceeds the grid
    tokens: then every grid token stays unpooled and the rest of the budget goes to newline tokens spread
    evenly in raster order (``lattice``), so every k <= V is met and k = V keeps everything unchanged. A pooled
    token's size is its window's token count (``merge="proportional"``; windows of dropped cells and newline
    tokens are not merged)."""
    grids = layout.grid_tokens()
    grid = torch.cat([idx.reshape(-1) for _, idx in grids])
    if k >= grid.numel():
        newline = torch.ones(layout.size, dtype=torch.bool)
        newline[grid] = False
        newline = newline.nonzero().flatten()
        extra = newline[lattice(newline.numel(), k - grid.numel()).indices] if k > grid.numel() else newline[:0]
        return Selection(indices=torch.sort(torch.cat([grid, extra])).values.to(features.device))
    shares = split_budget(k, [idx.numel() for _, idx in grids])
    kept_idx, kept_emb, kept_size = [], [], []
    for (_, idx), share in zip(grids, shares):
        if share == 0:
            continue
        rows, cols = idx.shape
        r, c = pooled_grid(rows, cols, share)
        cells = [(i, j) for i in range(r) for j in range(c)]
        if len(cells) > share:
            keep = lattice(len(cells), share).indices.tolist()
            cells = [cells[t] for t in keep]
        for i, j in cells:
            r0, r1 = (i * rows) // r, -((-(i + 1) * rows) // r)
            c0, c1 = (j * cols) // c, -((-(j + 1) * cols) // c)
            window = idx[r0:r1, c0:c1].reshape(-1).to(features.device)
            kept_idx.append(window[0])
            kept_emb.append(features[window].mean(0))
            kept_size.append(window.numel())
    indices = torch.stack(kept_idx)
    order = torch.argsort(indices)
    sizes = torch.tensor(kept_size, dtype=torch.float32, device=features.device)
    return Selection(indices=indices[order], embeddings=torch.stack(kept_emb)[order], sizes=sizes[order])


# ---- greedy diversity -------------------------------------------------------------------------------------
def unit_rows(features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero), in ``dtype``: cosine similarity = dot product."""
    return F.normalize(features.to(dtype), dim=-1)


def on_demand(unit: torch.Tensor) -> SimColumn:
    """Similarity columns computed when needed, O(V·D) each: cheaper than a V×V matrix when k ≪ V."""
    return lambda j: unit @ row(unit, j)


@dataclass(frozen=True, eq=False)
class MatrixColumns:
    """Columns read off a precomputed [V, V] similarity matrix (row j: token j against all). :func:`greedy` over
    them may run as one GPU kernel (:func:`vtprune.kernels.greedy_on_matrix`)."""

    matrix: torch.Tensor

    def __call__(self, j: torch.Tensor | int) -> torch.Tensor:
        return row(self.matrix, j)


def from_matrix(sim: torch.Tensor) -> MatrixColumns:
    """Columns read off a precomputed [V, V] similarity matrix (row j: token j against all)."""
    return MatrixColumns(sim)


@dataclass(frozen=True, eq=False)
class Farthest:
    """Step score ``weight · (1 - maxsim)``, or ``1 - maxsim`` without a weight: max-min diversity, SADS."""

    weight: torch.Tensor | None = None

    def __call__(self, maxsim: torch.Tensor) -> torch.Tensor:
        far = 1 - maxsim
        return far if self.weight is None else self.weight * far


@dataclass(frozen=True, eq=False)
class Marginal:
    """Step score ``relevance - penalty · maxsim``: MMR with ``relevance = λ·Imp`` and ``penalty = 1 - λ``."""

    relevance: torch.Tensor
    penalty: float

    def __call__(self, maxsim: torch.Tensor) -> torch.Tensor:
        return self.relevance - self.penalty * maxsim


def row(x: torch.Tensor, j: torch.Tensor | int) -> torch.Tensor:
    """``x[j]`` for an int or a 0-d index tensor without a host sync (indexing with a 0-d tensor reads it back
    to the host: one device round trip per greedy step on a GPU)."""
    return x.index_select(0, j.reshape(1))[0] if torch.is_tensor(j) else x[j]


def greedy(column: SimColumn, num_tokens: int, k: int, first: torch.Tensor | int, score: StepScore,
           device: torch.device | str) -> torch.Tensor:
    """Pick ``first``, then repeatedly the token maximising ``score(maxsim)`` until k are picked. Over a matrix's
    columns with a :class:`Farthest` or :class:`Marginal` score, one GPU kernel launch where it applies (same
    picks)."""
    if isinstance(column, MatrixColumns) and isinstance(score, (Farthest, Marginal)):
        fused = (kernels.greedy_on_matrix(column.matrix, k, first, kernels.FARTHEST, score.weight)
                 if isinstance(score, Farthest) else
                 kernels.greedy_on_matrix(column.matrix, k, first, kernels.MARGINAL, score.relevance, score.penalty))
        if fused is not None:
            return fused
    picks = torch.empty(k, dtype=torch.long, device=device)
    chosen = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    j = torch.as_tensor(first, dtype=torch.long, device=device)
    maxsim: torch.Tensor | None = None
    for t in range(k):
        picks[t] = j
        chosen.index_fill_(0, j.reshape(1), True)
        if t == k - 1:
            break
        col = column(j)
        maxsim = col if maxsim is None else torch.maximum(maxsim, col)
        j = score(maxsim).masked_fill(chosen, float("-inf")).argmax()
    return picks


def min_max(x: torch.Tensor, eps: float, constant: float = 0.0) -> torch.Tensor:
    """``(x - min) / (max - min + eps)``; ``constant`` everywhere when all values are equal."""
    lo, hi = x.min(), x.max()
    if bool(hi == lo):
        return torch.full_like(x, constant)
    return (x - lo) / (hi - lo + eps)


def max_min(column: SimColumn, num_tokens: int, k: int, first: torch.Tensor | int,
            device: torch.device | str) -> torch.Tensor:
    """Max-min diversity / farthest-point traversal with distance ``1 - cos``: each step adds the token
    farthest from its nearest picked token (DivPrune, k-center)."""
    return greedy(column, num_tokens, k, first, Farthest(), device)


def greedy_blocks(column: SimColumn, first_score: torch.Tensor, k: int, score: StepScore, per_step: int
                  ) -> torch.Tensor:
    """:func:`greedy` taking up to ``per_step`` tokens per step: the top ``per_step`` of ``first_score``, then
    repeatedly the top ``per_step`` unpicked tokens by ``score(maxsim)`` (the last step takes what is left of
    k), ``maxsim`` being updated from every column of the step's picks. Ties go to the lowest index."""
    num_tokens = first_score.numel()
    chosen = torch.zeros(num_tokens, dtype=torch.bool, device=first_score.device)
    picks: list[torch.Tensor] = []
    maxsim: torch.Tensor | None = None
    taken = 0
    while taken < k:
        step = first_score if maxsim is None else score(maxsim)
        block = torch.sort(step.masked_fill(chosen, float("-inf")), descending=True, stable=True
                           ).indices[:min(per_step, k - taken)]
        picks.append(block)
        chosen[block] = True
        taken += block.numel()
        if taken < k:
            cols = torch.stack([column(j) for j in block]).amax(0)
            maxsim = cols if maxsim is None else torch.maximum(maxsim, cols)
    return torch.cat(picks)


def mmr(column: SimColumn, importance: torch.Tensor, k: int, lam: float, per_step: int = 1) -> torch.Tensor:
    """Maximal Marginal Relevance (IDPruner): first the most important token, then
    ``argmax λ·Imp(i) - (1-λ)·max_{j∈P} cos(i, j)``; ``importance`` is already normalised. ``per_step`` > 1 takes
    that many tokens per step (the reference's ``parallel_k``; the first step: the most important ones)."""
    imp = importance.to(torch.float32)
    step_score = Marginal(lam * imp, 1 - lam)
    if per_step > 1:
        return greedy_blocks(column, imp, k, step_score, per_step)
    return greedy(column, imp.numel(), k, imp.argmax(), step_score, imp.device)


def sads(column: SimColumn, sensitivity: torch.Tensor, k: int) -> torch.Tensor:
    """Sensitivity-Aware Diverse Selection (ZOO-Prune): first the most sensitive token, then
    ``argmax Ŝ(i)·min_{j∈P}(1 - cos(i, j))`` with Ŝ the min-max normalised sensitivity (≡ 1 if constant)."""
    s = min_max(sensitivity.to(torch.float32), eps=1e-8, constant=1.0)
    return greedy(column, s.numel(), k, s.argmax(), Farthest(s), s.device)


# ---- attention rows and graphs ---------------------------------------------------------------------------
def expand_kv(key: torch.Tensor, heads: int) -> torch.Tensor:
    """[H_kv, n, d] -> [heads, n, d]: grouped-query keys repeated for the query heads that share them."""
    return key if key.shape[0] == heads else key.repeat_interleave(heads // key.shape[0], dim=0)


def attention_rows(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of queries [H, m, d] over keys [H_kv, n, d], no mask: [H, m, n] in float32."""
    key = expand_kv(key, query.shape[0]).float()
    return (query.float() @ key.transpose(-1, -2) * scaling).softmax(-1)


def causal_attention_rows(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, scaling: float,
                          window: int | None = None) -> torch.Tensor:
    """Causal softmax attention of the queries [H, m, d] at sequence indices ``rows`` [m] over keys [H_kv, n, d]:
    row i sees keys j <= i (and i - j < ``window`` in a sliding-window layer), as the model's own attention. [H, m, n]
    in float32; only these m rows are materialised."""
    key = expand_kv(key, query.shape[0]).float()
    logits = query.float() @ key.transpose(-1, -2) * scaling
    gap = rows.to(key.device)[:, None] - torch.arange(key.shape[1], device=key.device)  # i - j
    hidden = (gap < 0) if window is None else (gap < 0) | (gap >= window)
    return logits.masked_fill(hidden, float("-inf")).softmax(-1)


def block_rows(cols: int, heads: int, budget: int) -> int:
    """Query rows per block so that a block's [heads, rows, cols] probabilities stay within ``budget``."""
    return max(1, budget // max(1, heads * cols))


def attention_transpose_apply(query: torch.Tensor, key: torch.Tensor, scaling: float, weights: torch.Tensor,
                              budget: int | None = None, heads_per_block: int | None = None) -> torch.Tensor:
    """Per head, ``Aᵀ w``: ``out[h, j] = Σ_q weights[h, q]·A_h[q, j]`` for A = softmax(q kᵀ·scaling),
    streamed over blocks of ``heads_per_block`` heads × query rows so at most ``budget`` probabilities exist at once
    (defaults: :func:`attention_block`; one head per block on CPU, where a batched GEMM of thin per-head slices ran at
    half the speed of one tall one, all heads elsewhere, for fewer launches). [H, n], a selection signal: detached
    (the in-place products into one buffer cannot carry gradients)."""
    query, key, weights = query.detach(), key.detach(), weights.detach()
    heads, rows = query.shape[:2]
    key_t = expand_kv(key, heads).float().transpose(-1, -2).contiguous()  # converted once, not per block
    query = query.float() * scaling  # the logits' scale folded into the queries: one pass over a block fewer
    cols = key_t.shape[-1]
    group = heads_per_block or (1 if query.device.type == "cpu" else heads)
    step = min(rows, block_rows(cols, group, budget or attention_block(query.device)))
    # one buffer reused by every block: a fresh one per block paid its page faults each time
    buffer = torch.empty(group * step * cols, dtype=torch.float32, device=query.device)
    out = torch.zeros(heads, cols, dtype=torch.float32, device=query.device)
    for h in range(0, heads, group):
        for s in range(0, rows, step):
            q = query[h:h + group, s:s + step]
            probs = buffer[:q.numel() // q.shape[-1] * cols].view(q.shape[0], q.shape[1], cols)
            torch.bmm(q, key_t[h:h + group], out=probs)
            torch.softmax(probs, -1, out=probs)  # in place: the fused kernel's one exp pass
            out[h:h + group] += torch.bmm(weights[h:h + group, None, s:s + step].float(), probs)[:, 0]
    return out


def attention_block(device: torch.device) -> int:
    """Probabilities per block of the streamed attention products on ``device``: 16 MB on CPU (cache-sized blocks
    ran fastest at Qwen2.5-VL's 11,520 patches, docs/benchmarks.md), 256 MB on accelerators (fewer launches)."""
    return ATTENTION_BLOCK if device.type == "cpu" else 1 << 26


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
                      tol: float = 0.0, budget: int | None = None) -> torch.Tensor:
    """Zero-TPrune's weighted PageRank per head: ``s ← Aᵀ s`` (each token's importance is the attention it
    receives, weighted by the importance of who attends). Row-stochastic A preserves the mass. [H, n]."""
    return power_iteration(lambda s: attention_transpose_apply(query, key, scaling, s, budget), init, iters, tol)


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


def size_weighted_merge(states: torch.Tensor, sizes: torch.Tensor, sources: torch.Tensor, target: torch.Tensor,
                        source_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's weighted average: ``sources`` [m, D] (sizes ``source_sizes``, default 1) merged into ``states``
    [k, D] of ``sizes`` [k] by ``target`` [m] -> (size-weighted mean states [k, D] in the states' dtype, summed
    sizes [k] float32). Accumulates in float32."""
    w = torch.ones(target.numel(), device=states.device) if source_sizes is None else source_sizes.float()
    total_size = sizes.float().index_add(0, target, w)
    total = (states.float() * sizes.float()[:, None]).index_add(0, target, sources.float() * w[:, None])
    return (total / total_size[:, None]).to(states.dtype), total_size


def merge_dropped(features: torch.Tensor, sel: Selection, sizes: torch.Tensor | None = None) -> Selection:
    """``sel`` with every dropped token of ``features`` [V, D] merged into its most cosine-similar kept token
    (lowest index on ties): size-weighted mean states, summed sizes. ``sizes`` [V]: how many tokens each of
    ``features`` already stands for (a later in-LLM cut of tokens merged before; default 1). A selection that
    already carries sizes (its pruner merged the tokens itself, e.g. VisionZip's contextual tokens) is returned as
    it is."""
    if sel.sizes is not None:
        return sel
    kept = sel.indices.to(features.device)
    states = features[kept] if sel.embeddings is None else sel.embeddings
    prior = torch.ones(features.shape[0], device=features.device) if sizes is None else sizes.float()
    drop = features.shape[0] - kept.numel()  # a selection of distinct tokens (its check, maybe deferred) leaves these
    if drop == 0:
        return Selection(indices=sel.indices, embeddings=sel.embeddings, sizes=prior[kept])
    dropped = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    dropped[kept] = False
    dropped = torch.nonzero_static(dropped, size=drop, fill_value=0).flatten()  # sized from the host: no read
    target = best_match(features[dropped], features[kept])[1]
    merged, total = size_weighted_merge(states, prior[kept], features[dropped], target, prior[dropped])
    return Selection(indices=sel.indices, embeddings=merged, sizes=total)


def dpc_knn(x: torch.Tensor, clusters: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering (density peaks with k-nearest-neighbour density, as TCFormer; k = ``clusters``) of x [n, D]:
    distances ÷ √D; density = exp(-mean squared distance to the k nearest, self included) + 1e-6·U(0,1) (from
    ``generator``, which breaks ties); δ = distance to the nearest denser token (the largest distance for the densest);
    centres = the ``clusters`` largest δ·density; every token joins its nearest centre (lowest index on ties), a centre
    itself. Returns (centres [c] as indices into x, by decreasing δ·density; cluster of each token [n] in 0..c-1)."""
    n = x.shape[0]
    if not 1 <= clusters <= n:
        raise VTPruneError(f"dpc_knn: {clusters} clusters of {n} tokens; expected 1 <= clusters <= tokens")
    dist, score = _density_peaks(x, clusters, generator)
    centres = torch.topk(score, clusters).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    return centres, assign


def cluster_means(x: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """Plain (unweighted) mean of x [n, D]'s rows per cluster of ``assign`` [n] -> [clusters, D], in x's dtype;
    accumulated in float32."""
    total = x.new_zeros(clusters, x.shape[-1], dtype=torch.float32).index_add(0, assign, x.float())
    # counted by index_add, not bincount, which reads its input's maximum back to the host on a GPU
    count = torch.zeros(clusters, device=x.device).index_add_(0, assign, torch.ones(assign.shape, device=x.device))
    count = count.clamp(min=1)
    return (total / count[:, None]).to(x.dtype)


# ---- node scores -------------------------------------------------------------------------------------------

def cls_attention(g: AttentionGraph) -> torch.Tensor:
    """Head-mean attention the [CLS] query pays every node (the [CLS] node's own entry included): [N]."""
    return attention_rows(g.query[:, :1], g.key, g.scaling)[:, 0].mean(0)


def received_attention(g: AttentionGraph, budget: int | None = None) -> torch.Tensor:
    """Head-mean attention each node receives, summed over all queries: [N]. The score for encoders
    without [CLS] (Qwen), and N times one PageRank iteration from a uniform start."""
    ones = torch.ones(g.heads, g.nodes, device=g.query.device)
    return attention_transpose_apply(g.query, g.key, g.scaling, ones, budget).mean(0)


def cls_or_received(g: AttentionGraph) -> torch.Tensor:
    """[CLS] attention where the encoder has a [CLS] token, else received attention."""
    return cls_attention(g) if g.has_cls else received_attention(g)


# ---- which captured encoder layer to read ------------------------------------------------------------------
def default_vision_layers(full_attention_layers: list[int], num_layers: int) -> list[int]:
    """The encoder layers the [CLS]/PageRank scorers read: the penultimate layer (CLIP: the layer whose
    output LLaVA feeds its projector) and the last full-attention block (encoders without [CLS]: Qwen's
    merger reads the last block). Which of the two is used is decided from the captured signals: [CLS]
    encoders read the deeper-but-one captured layer, others the deepest (see :func:`layer_roles`)."""
    return sorted({max(num_layers - 2, 0), full_attention_layers[-1]})


class ReadsEncoderAttention:
    """Pruner mixin: capture the layers :func:`reading_graphs` reads."""

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


def cls_attention_scores(view: VisualView) -> torch.Tensor:
    """[V] head-mean [CLS] attention of each visual token (CLIP, penultimate layer); for encoders without
    [CLS] (Qwen) the head-mean attention received from all patches in the last full-attention block,
    summed over each token's 2x2 merge group."""
    return pooled(reading_graphs(view), view.num_tokens, cls_or_received)


# ---- video: frames, temporal change, density peaks (DyCoke, EVS, FastVID) ---------------------------------
def paired_dissimilarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between each row of a [n, D] and the row of b [n, D] at the same index, in float32 (a zero row
    has cos 0): how much a token changed since the same spatial position of an earlier frame."""
    return 1 - (unit_rows(a) * unit_rows(b)).sum(-1)


def spread(groups: list[torch.Tensor], k: int) -> torch.Tensor:
    """k of the tokens listed in ``groups`` (index tensors, e.g. frames in raster order): k split over the groups
    by size (:func:`split_budget`), each group's share an even lattice of it (:func:`lattice`); sorted. The fallback
    of the video methods when the budget cannot hold every token they never drop (first frames, anchors)."""
    shares = split_budget(k, [g.numel() for g in groups])
    parts = [g[lattice(g.numel(), s).indices.to(g.device)] for g, s in zip(groups, shares) if s]
    return torch.sort(torch.cat(parts)).values if parts else groups[0][:0]


def density_peak_scores(x: torch.Tensor, neighbours: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DPC-KNN's centre score δ·density of each row of x [n, D] (FastVID's anchor score; :func:`dpc_knn` ranks
    centres the same way with ``neighbours = clusters``): distances ÷ √D; density = exp(-mean squared distance to the
    ``min(neighbours, n)`` nearest, self included) + 1e-6·U(0,1) from ``generator``; δ = distance to the nearest
    denser row (the largest distance for the densest). Returns [n] float32."""
    return _density_peaks(x, min(neighbours, x.shape[0]), generator)[1]


def _density_peaks(x: torch.Tensor, neighbours: int, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled distances [n, n], δ·density [n]) of DPC-KNN, shared by :func:`dpc_knn` and
    :func:`density_peak_scores`."""
    x = x.float()
    dist = torch.cdist(x, x) / math.sqrt(x.shape[-1])
    nearest = torch.topk(dist, neighbours, dim=-1, largest=False).values
    noise = torch.rand(x.shape[0], generator=generator, device=x.device)
    density = (-(nearest ** 2).mean(-1)).exp() + noise * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    return dist, torch.where(denser, dist, dist.max()).min(-1).values * density


@dataclass(frozen=True)
class Frames:
    """A view's grid tokens by frame, for the video methods. ``grids[t]``: frame t's grid token indices (its segments'
    grids in raster order, newline tokens excluded; a Qwen frame is a temporal group of 2 frames); ``shapes[t]``: the
    (rows, cols) of those segments; ``other``: every token in no frame's grid (newlines, tokens outside every frame),
    sorted; ``video``: whether frames follow each other in time (an image's segments are views of one instant, each
    its own frame)."""

    grids: tuple[torch.Tensor, ...]
    shapes: tuple[tuple[tuple[int, int], ...], ...]
    other: torch.Tensor
    video: bool

    def previous(self, t: int) -> torch.Tensor | None:
        """Frame t-1's grid when frame t of a video has one of the same shape, else ``None``."""
        if not self.video or t == 0 or self.shapes[t - 1] != self.shapes[t]:
            return None
        return self.grids[t - 1]


def frames_of(layout: ImageLayout) -> Frames:
    """The :class:`Frames` of ``layout``: a video's temporal groups (``layout.frames``), or an image's grid segments."""
    owner = layout.frames or tuple(range(len(layout.segments)))
    count = max(owner) + 1
    parts: list[list[torch.Tensor]] = [[] for _ in range(count)]
    shapes: list[list[tuple[int, int]]] = [[] for _ in range(count)]
    in_grid = torch.zeros(layout.size, dtype=torch.bool)
    for (_, idx), frame in zip(layout.grid_tokens(), owner):
        if frame >= 0:
            parts[frame].append(idx.flatten())
            shapes[frame].append(tuple(idx.shape))
            in_grid[idx.flatten()] = True
    grids = tuple(torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for p in parts)
    return Frames(grids=grids, shapes=tuple(map(tuple, shapes)), other=(~in_grid).nonzero().flatten(),
                  video=layout.is_video)


def mean_query_attention(g: AttentionGraph, group: torch.Tensor) -> torch.Tensor:
    """Node scores [N] of FastVID's frame attention: within each group of nodes (``group`` [N], e.g. the frame each
    patch feeds; -1 = none, scoring 0), the softmax attention the group's mean query pays each of its nodes,
    head mean (the [CLS] node, if any, belongs to no group)."""
    out = torch.zeros(g.nodes, device=g.query.device)
    for f in torch.unique(group[group >= 0]).tolist():
        nodes = (group == f).nonzero().flatten()
        query = g.query[:, nodes].float().mean(1, keepdim=True)
        out[nodes] = attention_rows(query, g.key[:, nodes].float(), g.scaling)[:, 0].mean(0)
    return out
