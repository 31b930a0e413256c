"""What a pruner sees and returns: a model-independent view of one image's visual tokens.

Adapters build these; pruners consume them and never touch a model class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Segment:
    """A raster block of an image's tokens: ``rows x cols`` grid tokens, plus one trailing newline token per
    row when ``newline`` (LLaVA-NeXT crops). Tokens are stored row-major in the sequence."""

    rows: int
    cols: int
    newline: bool = False

    @property
    def size(self) -> int:
        return self.rows * (self.cols + int(self.newline))


@dataclass(frozen=True)
class ImageLayout:
    """How an image's visual tokens tile space: consecutive segments (LLaVA-1.5: one 24x24 grid;
    LLaVA-NeXT: base view + newline-terminated crop grid; Qwen: one grid per temporal frame)."""

    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    @staticmethod
    def flat(n: int) -> "ImageLayout":
        """A square grid when ``n`` is a perfect square, otherwise a single row."""
        r = math.isqrt(n)
        return ImageLayout((Segment(r, r),)) if r * r == n else ImageLayout((Segment(1, n),))

    def grid_tokens(self) -> list[tuple[int, torch.Tensor]]:
        """Per segment: (segment index, [rows, cols] tensor of token indices into the image's tokens).
        Newline tokens are not part of any grid."""
        out, start = [], 0
        for i, seg in enumerate(self.segments):
            stride = seg.cols + int(seg.newline)
            idx = start + torch.arange(seg.rows)[:, None] * stride + torch.arange(seg.cols)[None, :]
            out.append((i, idx))
            start += seg.size
        return out


def anyres_view_labels(layout: ImageLayout) -> torch.Tensor | None:
    """For an AnyRes layout (LLaVA-NeXT: a square base grid, then a newline-terminated crop grid): the encoder
    view of every token — base 0, crops 1.. in raster order, newline tokens -1 — so that a pruner can work per
    view without knowing the model; ``None`` for other layouts. Crops are those of the smallest grid holding the
    unpadded crop grid (unpadding trims symmetric margins of less than one crop)."""
    segs = layout.segments
    if len(segs) != 2 or segs[0].newline or segs[0].rows != segs[0].cols or not segs[1].newline:
        return None
    g, rows, cols = segs[0].rows, segs[1].rows, segs[1].cols
    labels = torch.full((layout.size,), -1, dtype=torch.long)
    labels[:g * g] = 0
    if cols > 0:
        nph, npw = math.ceil(rows / g), math.ceil(cols / g)
        r = (torch.arange(rows)[:, None] + (nph * g - rows) // 2) // g
        c = (torch.arange(cols)[None, :] + (npw * g - cols) // 2) // g
        grid = torch.full((rows, cols + 1), -1, dtype=torch.long)
        grid[:, :cols] = 1 + r * npw + c
        labels[g * g:] = grid.flatten()
    return labels


@dataclass
class VisualView:
    """One image's visual tokens at the pruning site.

    features: [V, D] states of the image tokens: projected features (pre-LLM) or the input hidden
              states of decoder layer K (in-LLM).
    text:     [T, D] states of the same sample's non-visual, non-padding tokens (the prompt/question).
    layout:   spatial layout of the V tokens.
    extras:   optional signals an adapter captured on request (keys, attention, vision q/k, ...).
    """

    features: torch.Tensor
    text: torch.Tensor
    layout: ImageLayout
    site: str
    layer: int | None
    sample: int
    image: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]


@dataclass
class Selection:
    """A pruner's answer for one image: ``indices`` (sorted, unique, into 0..V-1) of the tokens kept, and
    optionally ``embeddings`` [k, D] replacing their states (merging methods such as pooling) and ``sizes`` [k]
    how many of the image's tokens each kept token stands for (read only with ``merge="proportional"``, which
    then merges no further)."""

    indices: torch.Tensor
    embeddings: torch.Tensor | None = None
    sizes: torch.Tensor | None = None

    def check(self, num_tokens: int, k: int) -> None:
        """Fail loudly if a pruner broke the contract."""
        idx = self.indices
        if idx.dim() != 1 or idx.numel() != k:
            raise RuntimeError(f"pruner returned {tuple(idx.shape)} indices, expected exactly {k}")
        if k and (idx.min() < 0 or idx.max() >= num_tokens or (idx[1:] <= idx[:-1]).any()):
            raise RuntimeError("pruner indices must be sorted, unique and within the image's tokens")
        if self.embeddings is not None and self.embeddings.shape[0] != k:
            raise RuntimeError(f"pruner returned {self.embeddings.shape[0]} embeddings for {k} indices")
        if self.sizes is not None and (self.sizes.shape != (k,) or bool((self.sizes < 1).any())):
            raise RuntimeError(f"pruner returned sizes of shape {tuple(self.sizes.shape)} for {k} indices; "
                               "expected one size >= 1 per kept token")


def budget(keep: float | int, num_tokens: int) -> int:
    """Tokens kept for an image of ``num_tokens``: round-half-up of ``keep * V`` (at least 1) for a float,
    ``min(keep, V)`` for an int."""
    if isinstance(keep, float):
        return max(1, min(num_tokens, math.floor(keep * num_tokens + 0.5)))
    return min(int(keep), num_tokens)
