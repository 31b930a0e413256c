"""PyramidDrop (CVPR 2025): rank & drop visual tokens at several decoder layers, keeping a geometric share at each."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..capture import LAYER_QK
from ..config import ModeOption, PrunerConfig
from ..errors import VTPruneError
from ..registry import register_pruner
from ..view import ImageLayout, VisualView, budget
from .base import ScorerPruner
from .fastv import last_token_attention

#: the reference's cut layers (``layer_list``) on LLaVA-1.5-7B's 32 layers
REFERENCE_LAYERS = (8, 16, 24)


def default_layers(num_layers: int, allowed: list[int]) -> tuple[int, ...]:
    """The reference's layers 8/16/24 on decoders of 32 layers or more; on shallower ones the same fractions of the
    depth, ``⌊l·T/32 + 1/2⌋``; each snapped to the nearest layer in ``allowed`` (the lower on a tie), repeats
    dropped (4 layers: 1/2/3; 28 layers: 7/14/21)."""
    if not allowed:
        raise VTPruneError("pyramiddrop: this model has no decoder layer it can cut at (it reads the attention of "
                           "the cut layer itself, and the family refuses every candidate)")
    targets = REFERENCE_LAYERS if num_layers >= 32 else [math.floor(l * num_layers / 32 + 0.5) for l in REFERENCE_LAYERS]
    return tuple(sorted({min(allowed, key=lambda a: (abs(a - t), a)) for t in targets}))


@dataclass
class PyramidDropConfig(PrunerConfig, ModeOption):
    """PyramidDrop: S cuts (default at layers 8/16/24, ``layers``) keeping a geometric share of each image's V tokens.

    keep:   what is left after the last cut. A float keeps ``keep^(s/S)`` of V after cut s (``keep=0.125`` with 3 cuts
            = the reference's λ = 0.5: 1/2, 1/4, 1/8); an int k keeps ``k·2^(S-s)`` tokens (λ = 1/2 anchored at k).
            ``keep=1.0`` is one keep-all cut.
    layers: the cut layers (strictly increasing; default: the reference's 8/16/24 scaled to shallower decoders and
            snapped to layers the family can cut at, :func:`default_layers`). ``schedule=`` overrides both; ``layer=K``
            makes a single cut at K.
    mode:   ``"clean"`` counts ``⌊keep_s·V + 1/2⌋`` per cut (the last one is exactly ``keep``'s budget) and keeps the
            original positions; ``"reference"`` truncates ``int(V·λ^s)`` as the reference does (at least 1) and
            renumbers each layer group's tokens 0..N-1 from the first cut on, every group decoding from its own cache
            length (1-D RoPE decoders only: LLaVA-1.5/NeXT/OneVision, InternVL; docs/algorithms.md)."""

    name = "pyramiddrop"
    site: str = "layer"
    layer: int | None = None  # None: the cuts come from ``layers`` (or the default) when the model is known
    keep: float | int = 0.125
    layers: tuple[int, ...] | None = None

    def validate(self) -> None:
        deferred = self.schedule is None and self.layer is None
        super().validate()
        self.validate_mode()
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)) or not layers or any(
                    isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in layers):
                raise VTPruneError(f"layers={layers!r}: expected a non-empty list of decoder layers (ints >= 1)")
            if any(b <= a for a, b in itertools.pairwise(layers)):
                raise VTPruneError(f"layers={layers!r}: the cut layers must strictly increase")
            self.layers = tuple(layers)
        if deferred:
            self.layer = None

    @property
    def compact_stages(self) -> bool:
        """``mode="reference"`` renumbers every layer group's tokens 0..N-1 and decodes each group from its own cache
        length, as the reference code does."""
        return self.reference

    def default_schedule(self, num_layers: int, allowed: list[int]) -> tuple[tuple[int, float | int], ...] | None:
        if self.layer is not None:  # a single cut at ``layer``
            return None
        layers = self.layers or default_layers(num_layers, allowed)
        cuts = len(layers)
        keep = self.keep
        if isinstance(keep, float):
            if keep == 1.0:
                return ((layers[0], 1.0),)
            keeps: list[float | int] = [keep ** (s / cuts) for s in range(1, cuts)] + [keep]
        else:
            keeps = [keep * 2 ** (cuts - s) for s in range(1, cuts + 1)]
        return tuple(zip(layers, keeps))


@register_pruner
class PyramidDropPruner(ScorerPruner):
    """PyramidDrop: at each cut layer b, the image tokens the last prompt token would attend to most in layer b
    itself — layer b's ``input_layernorm``, q/k projections and RoPE applied to layer b-1's output, one query row,
    softmax in fp32 over all keys, mean over heads — recomputed outside the layer, so SDPA/FlashAttention keep
    running. Multi-stage through the in-LLM site's schedule (any cut sees only the tokens still present).
    See docs/algorithms.md, section ``pyramiddrop``."""

    config_class = PyramidDropConfig
    sites = ("layer",)
    needs = frozenset({LAYER_QK})

    def count(self, layout: ImageLayout) -> int:
        keep = self.config.keep
        if self.config.reference and isinstance(keep, float):  # int(V·λ^s); the tolerance absorbs keep^(s/S)'s rounding
            return max(1, math.floor(layout.size * keep + 1e-9))
        return budget(keep, layout.size)

    def score(self, view: VisualView) -> torch.Tensor:
        qk = view.extras["layer_qk"]
        return last_token_attention(qk.query, qk.key, qk.scaling, qk.window)[qk.image]

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``4·V·D² + 2·V·D`` per cut: layer b's q and k projections of the V image tokens (K/V heads = query heads)
        and the last prompt token's query against their keys. Text tokens' projections are not counted."""
        return 4 * before * dim * dim + 2 * before * dim
