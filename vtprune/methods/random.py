"""Random: a seeded uniform random subset, the baseline every paper compares against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModeOption, PrunerConfig
from ..registry import register_pruner
from ..view import VisualView
from .base import ScorerPruner
from .divprune import RoundedReferenceCount


@dataclass
class RandomConfig(PrunerConfig, ModeOption):
    """Keep a seeded uniform random subset (in original order).

    mode: ``"clean"`` keeps the exact budget; ``"reference"`` AngelSlim's random strategy's count
    ``round(V·(1-r))`` with Python's half-to-even rounding (``keep = 1-r``), at least 1. The draw is the same."""

    name = "random"

    def validate(self) -> None:
        super().validate()
        self.validate_mode()


def random_scores(view: VisualView, generator: torch.Generator) -> torch.Tensor:
    """[V] uniform random scores in [0, 1) from an explicit generator."""
    return torch.rand(view.num_tokens, generator=generator, device=view.features.device)


@register_pruner
class RandomPruner(RoundedReferenceCount, ScorerPruner):
    """Random scores + top-k. One draw per (seed, token count), so batching never changes the choice.
    See docs/algorithms.md, section ``random``."""

    config_class = RandomConfig

    def score(self, view: VisualView) -> torch.Tensor:
        return random_scores(view, self.generator(view))

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """0: random numbers and a sort, no floating-point arithmetic on the states."""
        return 0
