"""Greedy diversity selectors (max-min / k-center, MMR, SADS): pure tensor functions returning indices.

All of them grow a set P one token per step and keep, for every token, its largest cosine similarity to P
(``maxsim``), updated from the newly picked token's similarity column only: O(V) work per step given the
column (O(V·D) when the column is computed on demand), O(k·V) overall, no host synchronisation in the loop. A step
picks the argmax of a method-specific score of ``maxsim``; ties go to the lowest index, already-picked
tokens are masked out. Results are in pick order; pruners sort them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: the similarity of every token to token ``j`` (a 0-d long tensor), shape [V]
SimColumn = Callable[[torch.Tensor], torch.Tensor]
#: a step's score of every token, from its running max similarity to the picked set
StepScore = Callable[[torch.Tensor], torch.Tensor]


def unit_rows(features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero), in ``dtype``: cosine similarity = dot product."""
    return F.normalize(features.to(dtype), dim=-1)


def on_demand(unit: torch.Tensor) -> SimColumn:
    """Similarity columns computed when needed, O(V·D) each: cheaper than a V×V matrix when k ≪ V."""
    return lambda j: unit @ unit[j]


def from_matrix(sim: torch.Tensor) -> SimColumn:
    """Columns read off a precomputed [V, V] similarity matrix (row j: token j against all)."""
    return lambda j: sim[j]


def greedy(column: SimColumn, num_tokens: int, k: int, first: torch.Tensor | int, score: StepScore,
           device: torch.device | str) -> torch.Tensor:
    """Pick ``first``, then repeatedly the token maximising ``score(maxsim)`` until k are picked."""
    picks = torch.empty(k, dtype=torch.long, device=device)
    chosen = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    j = torch.as_tensor(first, dtype=torch.long, device=device)
    maxsim: torch.Tensor | None = None
    for t in range(k):
        picks[t] = j
        chosen[j] = True
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
    return greedy(column, num_tokens, k, first, lambda maxsim: 1 - maxsim, device)


def nearest_neighbour_seed(sim: torch.Tensor, second_smallest: bool = False) -> torch.Tensor:
    """DivPrune's first pick: the token whose nearest other token is farthest (distance ``1 - cos``).
    ``second_smallest`` follows the reference literally (2nd smallest distance of each column, the smallest
    being the self-distance) instead of excluding the diagonal."""
    dist = 1 - sim
    if second_smallest:
        nearest = dist.kthvalue(2, dim=0).values
    else:
        nearest = dist.masked_fill(torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device),
                                   float("inf")).amin(0)
    return nearest.argmax()


def farthest_on_average_seed(unit: torch.Tensor) -> torch.Tensor:
    """k-center seed: the token with the largest mean ``1 - cos`` to all others, in O(V·D) through the sum
    of the unit rows (mean over j≠i of cos = (u_i·Σu - u_i·u_i) / (V - 1))."""
    self_sim = (unit * unit).sum(-1)
    return (unit @ unit.sum(0) - self_sim).argmin()


def mmr(column: SimColumn, importance: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """Maximal Marginal Relevance (IDPruner): first the most important token, then
    ``argmax λ·Imp(i) - (1-λ)·max_{j∈P} cos(i, j)``; ``importance`` is already normalised."""
    imp = importance.to(torch.float32)
    return greedy(column, imp.numel(), k, imp.argmax(), lambda maxsim: lam * imp - (1 - lam) * maxsim,
                  imp.device)


def sads(column: SimColumn, sensitivity: torch.Tensor, k: int) -> torch.Tensor:
    """Sensitivity-Aware Diverse Selection (ZOO-Prune): first the most sensitive token, then
    ``argmax Ŝ(i)·min_{j∈P}(1 - cos(i, j))`` with Ŝ the min-max normalised sensitivity (≡ 1 if constant)."""
    s = min_max(sensitivity.to(torch.float32), eps=1e-8, constant=1.0)
    return greedy(column, s.numel(), k, s.argmax(), lambda maxsim: s * (1 - maxsim), s.device)
