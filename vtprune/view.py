"""What a pruner sees and returns: a model-independent view of one image's visual tokens.

Adapters build these; pruners consume them and never touch a model class.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import VTPruneError


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
    """How an image's (or a video's) visual tokens tile space and time: consecutive segments (LLaVA-1.5: one
    24x24 grid; LLaVA-NeXT: base view + newline-terminated crop grid; a Qwen video: one grid per temporal group).

    ``frames`` is empty for an image; for a video it gives, per segment, the temporal group (frame) its tokens
    belong to — non-decreasing from 0, or -1 for a segment outside every frame (LLaVA-OneVision's trailing
    newline token). A Qwen temporal group covers ``temporal_patch_size`` (2) input frames."""

    segments: tuple[Segment, ...]
    frames: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.frames:
            return
        real = [f for f in self.frames if f >= 0]
        if len(self.frames) != len(self.segments) or any(f < -1 for f in self.frames) or not real \
                or real[0] != 0 or any(b - a not in (0, 1) for a, b in itertools.pairwise(real)):
            raise VTPruneError(f"video layout frames {self.frames} must give one frame per segment "
                               f"({len(self.segments)}), counting up from 0 in steps of 0 or 1 (-1: no frame)")

    @staticmethod
    def video(frame: Segment, frames: int) -> ImageLayout:
        """A video of ``frames`` temporal groups, each one ``frame`` grid."""
        return ImageLayout((frame,) * frames, tuple(range(frames)))

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def is_video(self) -> bool:
        return bool(self.frames)

    @property
    def num_frames(self) -> int:
        """Temporal groups of a video (1 for an image)."""
        return max(self.frames) + 1 if self.frames else 1

    def frame_index(self) -> torch.Tensor:
        """LongTensor[size]: the temporal group of every token (0 everywhere for an image, -1 on a video's
        tokens outside every frame)."""
        if not self.frames:
            return torch.zeros(self.size, dtype=torch.long)
        return torch.cat([torch.full((s.size,), f, dtype=torch.long) for s, f in zip(self.segments, self.frames)])

    def frame_tokens(self) -> list[torch.Tensor]:
        """Per temporal group: the sorted token indices (into the video's tokens) that belong to it."""
        index = self.frame_index()
        return [torch.nonzero(index == f).flatten() for f in range(self.num_frames)]

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
    text:     [T, D] states of the same sample's non-visual, non-padding tokens (the prompt/question); may be
              given as a zero-argument callable, called on first read (the engine's: most pruners never read it).
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


def _get_text(view: VisualView) -> torch.Tensor:
    text = view.__dict__["_text"]
    if callable(text):
        text = view.__dict__["_text"] = text()
    return text


def _set_text(view: VisualView, text: Any) -> None:
    view.__dict__["_text"] = text


# a property over the dataclass field, so that ``VisualView(text=...)``, ``replace`` and every reader keep working
VisualView.text = property(_get_text, _set_text, doc="[T, D] the sample's text token states (found on first read)")


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
        """Fail loudly if a pruner broke the contract (one host read of the device checks)."""
        self.check_shapes(k)
        broken = self.broken(num_tokens)
        if broken is not None and bool(broken):
            self.explain(num_tokens)

    def check_shapes(self, k: int) -> None:
        """The contract checks that read no device value: one index per kept token, one embedding and size each."""
        if self.indices.dim() != 1 or self.indices.numel() != k:
            raise RuntimeError(f"pruner returned {tuple(self.indices.shape)} indices, expected exactly {k}")
        if self.embeddings is not None and self.embeddings.shape[0] != k:
            raise RuntimeError(f"pruner returned {self.embeddings.shape[0]} embeddings for {k} indices")
        if self.sizes is not None and self.sizes.shape != (k,):
            raise RuntimeError(f"pruner returned sizes of shape {tuple(self.sizes.shape)} for {k} indices; "
                               "expected one size >= 1 per kept token")

    def broken(self, num_tokens: int) -> torch.Tensor | None:
        """0-d bool on the device, true when the indices are not sorted, unique and in ``[0, num_tokens)`` or a size
        is below 1 (``None``: nothing to check), so that a caller reads it with its other device values at once."""
        idx = self.indices
        bad = None
        if idx.numel():  # strictly increasing from above -1 to below num_tokens
            bad = torch.diff(idx, prepend=idx.new_full((1,), -1), append=idx.new_full((1,), num_tokens)).le(0).any()
        if self.sizes is not None and self.sizes.numel():
            small = (self.sizes < 1).any().to(idx.device)
            bad = small if bad is None else bad | small
        return bad

    def explain(self, num_tokens: int) -> None:
        """Raise what :meth:`broken` found, reading the details back (only once a check failed)."""
        idx = self.indices
        if idx.numel() and (idx.min() < 0 or idx.max() >= num_tokens or (idx[1:] <= idx[:-1]).any()):
            raise RuntimeError("pruner indices must be sorted, unique and within the image's tokens")
        raise RuntimeError(f"pruner returned sizes of shape {tuple(self.sizes.shape)} for {idx.numel()} indices; "
                           "expected one size >= 1 per kept token")


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, without dispatching a no-op ``.to`` when it is there already (one op per call counts at
    batch 1, where a GPU waits on the host's launches)."""
    return t if t.device == device else t.to(device)


def budget(keep: float | int, num_tokens: int) -> int:
    """Tokens kept for an image of ``num_tokens``: round-half-up of ``keep * V`` (at least 1) for a float,
    ``min(keep, V)`` for an int."""
    if isinstance(keep, float):
        return max(1, min(num_tokens, math.floor(keep * num_tokens + 0.5)))
    return min(int(keep), num_tokens)


def frame_budgets(k: int, layout: ImageLayout) -> list[int]:
    """A video's ``k`` kept tokens shared over its frames in proportion to their token counts ``n_f``
    (``per_frame=True``): each frame gets ``floor(k n_f / N)``, and the tokens left over go one each to the frames
    with the largest remainders, earlier frames first on ties (largest-remainder rounding). The counts sum to
    ``k`` (``N``: the tokens inside frames; a frame never gets more than it has)."""
    sizes = [int(t.numel()) for t in layout.frame_tokens()]
    total = sum(sizes)
    k = min(k, total)
    counts = [k * n // total for n in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda f: (-(k * sizes[f] % total), f))
    for f in by_remainder[:k - sum(counts)]:
        counts[f] += 1
    return counts
