"""Informed references: keep the tokens the caller ranks highest, from priorities it knows and the model does not.

Not a pruning method: an upper-bound reference for leaderboards. The testbed exports, per question, one priority per
visual token (``token_priority.question``: 2 = covers the question's target objects, 1 = another object,
0 = background; ``token_priority.objects``: 1 = any object), so ``informed`` with its default key is the
question-aware oracle and with ``key="token_priority.objects"`` the object oracle of the feasibility study. The
harness passes each question's extra data.jsonl fields as its hint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..capture import HINTS
from ..config import PrunerConfig
from ..errors import VTPruneError
from ..registry import register_pruner
from ..view import VisualView
from .base import ScorerPruner
from .random import random_scores


@dataclass
class InformedConfig(PrunerConfig):
    """Top-k of caller-given token priorities: each sample's hint (``PruneHandle.set_hints``) maps ``key`` (dots
    walk nested mappings) to one number per visual token of its image (or, for several images per sample, a list
    of such lists), higher = keep first; ties are broken by a seeded random draw."""

    name = "informed"
    key: str = "token_priority.question"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.key, str) or not self.key:
            raise VTPruneError(f"key={self.key!r}: expected the name of a priority entry in each sample's hint")


@register_pruner
class InformedPruner(ScorerPruner):
    """Priorities from the hint + a random tie-break in [0, 1) (so priorities must differ by >= 1 to dominate).
    See docs/algorithms.md, section ``informed``."""

    config_class = InformedConfig
    needs = frozenset({HINTS})

    def score(self, view: VisualView) -> torch.Tensor:
        if "hint" not in view.extras:
            raise VTPruneError(f"informed pruner: no hint for batch row {view.sample}; pass one per row with "
                               "handle.set_hints([...]) before the forward")
        values = view.extras["hint"]
        for part in self.config.key.split("."):
            if not isinstance(values, Mapping) or part not in values:
                raise VTPruneError(f"informed pruner: sample {view.sample}'s hint has no {self.config.key!r} entry")
            values = values[part]
        if values and isinstance(values[0], (list, tuple)):  # one list per image of the sample
            values = values[view.extras["hint_image"]]
        priority = torch.as_tensor(values, dtype=torch.float32, device=view.features.device)
        if priority.shape != (view.num_tokens,):
            raise VTPruneError(f"informed pruner: hint[{self.config.key!r}] of sample {view.sample} has shape "
                               f"{tuple(priority.shape)}, expected one priority per visual token ({view.num_tokens})")
        return priority + random_scores(view, self.generator(view))

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        """``V``: one add of the tie-break per token (the priorities come from the caller)."""
        return before
