"""DART (EMNLP 2025): keep the image tokens least duplicated with a few pivot tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..capture import FINAL_NORM, LLM_QK, LLMQK, text_after_image
from ..config import ModeOption, PrunerConfig, check_int
from ..errors import VTPruneError
from ..registry import register_pruner
from ..view import ImageLayout, Selection, VisualView, budget
from .base import Pruner


@dataclass
class DARTConfig(PrunerConfig, ModeOption):
    """DART at decoder layer K (default 2). image_pivots / text_pivots: pivots taken among the image tokens
    and among the tokens after the image, by L1 key norm at layer K-1. mode: ``"clean"`` (exact budget) or
    ``"reference"`` (the reference's count rule and pivot order), see :class:`DARTPruner`."""

    name = "dart"
    site: str = "layer"
    layer: int | None = None  # site="layer" fills in K = 2
    image_pivots: int = 4
    text_pivots: int = 4

    def validate(self) -> None:
        super().validate()
        for field in ("image_pivots", "text_pivots"):
            check_int(self, field, 0)
        if self.image_pivots + self.text_pivots == 0:
            raise VTPruneError("image_pivots and text_pivots are both 0: DART needs at least one pivot")
        self.validate_mode()


def key_l1_norms(key: torch.Tensor) -> torch.Tensor:
    """L1 norm of each token's key with heads concatenated, [H_kv, n, d] -> [n] (GQA repetition would
    only rescale it)."""
    return key.float().abs().sum((0, 2))


def top_indices(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The n highest scores' indices, best first (lowest index on ties)."""
    return torch.sort(scores, descending=True, stable=True).indices[:n]


def quotas(total: int, pivots: int) -> list[int]:
    """``total`` picks over ``pivots`` pivots in visiting order: ``⌊total/pivots⌋`` each, one more for the
    first ``total mod pivots`` (none left over when the reference count rule produced ``total``)."""
    base, extra = divmod(total, pivots)
    return [base + int(i < extra) for i in range(pivots)]


def least_duplicated(sim: torch.Tensor, takes: list[int], taken: torch.Tensor) -> torch.Tensor:
    """DART's gathering: pivot by pivot (rows of ``sim`` [P, V], cosine to each image token), take its
    ``takes[i]`` least similar tokens not yet ``taken`` (bool [V], updated in place; lowest index on ties)."""
    picked = []
    for row, take in zip(sim, takes):
        if take == 0:
            continue
        chosen = torch.sort(row.masked_fill(taken, float("inf")), stable=True).indices[:take]
        taken.index_fill_(0, chosen, True)
        picked.append(chosen)
    return torch.cat(picked) if picked else sim.new_zeros(0, dtype=torch.long)


def set_order(indices: list[int]) -> list[int]:
    """Where each element of ``list(set(indices))`` sits in ``indices``: the reference visits its pivots in
    CPython's iteration order of a ``set`` of their sequence indices (hash-slot order for small ints)."""
    return [indices.index(i) for i in set(indices)]


@register_pruner
class DARTPruner(Pruner):
    """DART at layer K: pivots = the ``image_pivots`` image tokens and ``text_pivots`` tokens after the
    image with the largest L1 norm of their layer-(K-1) post-RoPE keys (heads concatenated); then each pivot
    in turn takes its least cosine-similar image tokens (on final-normed layer-(K-1) outputs) from a shared
    pool. Kept = image pivots + gathered tokens, original order and positions; keys and hidden states only,
    so it runs with SDPA/FlashAttention.

    ``mode="clean"`` (default): exactly ``k`` tokens — the ``k - image_pivots`` picks are split evenly over
    the pivots (the first ones take one more), pivots visited image-first then text, each by decreasing key
    norm; cosines in float32. With ``k <= image_pivots`` the top-k image pivots are kept.
    ``mode="reference"``: the reference's counts ``P_img + P·⌊min(M, V - P_img) / P⌋`` (P = all pivots; M =
    an int ``keep`` as ``max_num_trunction`` / LLaVA-NeXT's retain count, or ``keep·V`` for a float, as the
    Qwen code's ``V·(1-r)``), pivots visited in CPython ``set`` order of their sequence indices, cosines in
    the model's dtype. Text pivots come from the text tokens after the image (other images excluded).
    See docs/algorithms.md, section ``dart``."""

    config_class = DARTConfig
    sites = ("layer",)
    needs = frozenset({LLM_QK, FINAL_NORM})

    def count(self, layout: ImageLayout) -> int:
        if not self.config.reference:
            return super().count(layout)
        v, keep, c = layout.size, self.config.keep, self.config
        if budget(keep, v) >= v:
            return v
        image = min(c.image_pivots, v)
        wanted = keep * v if isinstance(keep, float) else keep
        per_pivot = math.floor(min(wanted, v - image) / (c.image_pivots + c.text_pivots))
        return min(v, image + (c.image_pivots + c.text_pivots) * per_pivot)

    def select(self, view: VisualView, k: int) -> Selection:
        qk: LLMQK = view.extras["llm_qk"]
        norms = key_l1_norms(qk.key)
        image_pivots = top_indices(norms[qk.image], min(self.config.image_pivots, k))
        if k <= image_pivots.numel():
            return Selection(indices=torch.sort(image_pivots).values)
        after = text_after_image(qk)
        text_rows = after[top_indices(norms[qk.text[after]], self.config.text_pivots)]
        reference = self.config.reference
        dtype = view.features.dtype if reference else torch.float32
        norm = view.extras["final_norm"]
        image_h = F.normalize(norm(view.features).to(dtype), dim=-1)
        text_h = F.normalize(norm(view.text[text_rows]).to(dtype), dim=-1)
        pivots = torch.cat([image_h[image_pivots], text_h])
        if pivots.shape[0] == 0:
            raise VTPruneError("dart found no pivots: image_pivots=0 and no text follows the image")
        if reference:
            order = set_order(qk.image[image_pivots].tolist() + qk.text[text_rows].tolist())
            pivots = pivots[torch.tensor(order, device=pivots.device)]
        taken = torch.zeros(view.num_tokens, dtype=torch.bool, device=image_h.device).index_fill_(0, image_pivots, True)
        takes = quotas(k - image_pivots.numel(), pivots.shape[0])
        gathered = least_duplicated(pivots @ image_h.T, takes, taken)
        return Selection(indices=torch.sort(torch.cat([image_pivots, gathered])).values)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``2·P·V·D`` with the default P = 8 pivots: each pivot's cosine to the V image states (normalising
        and the final norm are O(V·D) and not counted, nor the recomputed layer-(K-1) keys)."""
        pivots = DARTConfig.image_pivots + DARTConfig.text_pivots
        return 2 * pivots * before * dim
