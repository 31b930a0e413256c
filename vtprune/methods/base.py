"""The method contract: given one image's :class:`~vtprune.view.VisualView` and a budget k, return a
:class:`~vtprune.view.Selection`. A score-then-top-k method is a :class:`ScorerPruner` with one ``score()``;
shared tensor building blocks live in :mod:`vtprune.ops`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..config import ModeOption, PrunerConfig
from ..errors import VTPruneError
from ..view import ImageLayout, Selection, VisualView, budget


class Pruner:
    """Base class. Subclasses set :attr:`config_class`, implement :meth:`select` and give their selection
    cost in :meth:`overhead_flops`."""

    config_class: ClassVar[type[PrunerConfig]] = PrunerConfig
    #: sites this pruner can act at
    sites: ClassVar[tuple[str, ...]] = ("pre_llm", "layer")
    #: optional signals to capture for :attr:`VisualView.extras` (see :mod:`vtprune.capture`)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: when the method reads vision-encoder [CLS] attention ("" = never; e.g. "always", "importance='cls'"):
    #: families without [CLS] then get the received-attention fallback (README support matrix)
    reads_cls: ClassVar[str] = ""
    #: other registry names this pruner answers to (e.g. ``"pagerank"`` for ``"zero_tprune"``)
    aliases: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PrunerConfig) -> None:
        self.config = config

    def generator(self, view: VisualView) -> torch.Generator:
        """A generator seeded by (seed, token count): the same image gets the same draw whether it is
        run alone or in any batch, and every prefill (cached or not) repeats it. The mix is taken modulo
        2**64, as ``manual_seed`` takes negative seeds, so every valid seed stays in range."""
        g = torch.Generator(device=view.features.device)
        g.manual_seed((self.config.seed * 1_000_003 + view.num_tokens) % 2**64)
        return g

    def vision_layers(self, full_attention_layers: list[int], num_layers: int) -> list[int]:
        """Vision-encoder layers whose q/k this pruner reads (only with ``"vision_qk"`` in :attr:`needs`);
        ``full_attention_layers`` lists the layers that attend over the whole image."""
        return []

    def count(self, layout: ImageLayout) -> int:
        """Tokens to keep for an image with this layout. Clean modes use the exact budget rule of
        :func:`vtprune.view.budget`; reference modes may override it with their paper's count rule."""
        return budget(self.config.keep, layout.size)

    def select(self, view: VisualView, k: int) -> Selection:
        """Choose exactly ``k`` of ``view``'s tokens (k < V: keep-all never reaches a pruner)."""
        raise NotImplementedError

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int | None:
        """FLOPs of selecting ``kept`` of ``before`` visual tokens with ``dim``-wide states (one image, default
        options); ``None`` = no formula (unknown, not zero). Every built-in method gives its own."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


@dataclass
class TemporalConfig(PrunerConfig, ModeOption):
    """Options of the temporal methods (dycoke, fastvid, evs): the common ones and ``mode``. They compare a video's
    frames with each other, so they refuse ``per_frame=True``, under which the engine hands them one frame at a time,
    as an image."""

    def validate(self) -> None:
        super().validate()
        self.validate_mode()
        if self.per_frame:
            raise VTPruneError(f"per_frame=True: {self.name!r} compares a video's frames with each other and needs "
                               "the whole video at once; use per_frame=False (its budget is per video)")


class ScorerPruner(Pruner):
    """A method that scores every token and keeps the k highest (ties to the lowest index), in original
    order: subclasses implement :meth:`score` only."""

    def score(self, view: VisualView) -> torch.Tensor:
        """[V] one score per visual token, higher = keep first."""
        raise NotImplementedError

    def select(self, view: VisualView, k: int) -> Selection:
        return ops.top_k(self.score(view), k)
