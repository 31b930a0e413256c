"""Scorers: what matters, as one score per visual token (higher = keep). Pure tensor functions."""

from __future__ import annotations

import torch

from .view import VisualView


def random_scores(view: VisualView, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores from an explicit generator (the ``random`` baseline)."""
    return torch.rand(view.num_tokens, generator=generator, device=view.features.device)


def feature_norm(view: VisualView) -> torch.Tensor:
    """L2 norm of each token's state."""
    return view.features.float().norm(dim=-1)
