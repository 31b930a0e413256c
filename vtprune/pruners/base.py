"""The pruner contract: given one image's :class:`~vtprune.view.VisualView` and a budget k, return a
:class:`~vtprune.view.Selection`. Most pruners are a scorer + a selector (see ``scorers``/``selectors``)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..config import PrunerConfig
from ..view import ImageLayout, Selection, VisualView, budget


class Pruner:
    """Base class. Subclasses set :attr:`config_class` and implement :meth:`select`."""

    config_class: ClassVar[type[PrunerConfig]] = PrunerConfig
    #: sites this pruner can act at
    sites: ClassVar[tuple[str, ...]] = ("pre_llm", "layer")
    #: optional signals to capture for :attr:`VisualView.extras` (see :mod:`vtprune.capture`)
    needs: ClassVar[frozenset[str]] = frozenset()

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
