"""Selectors: how a set of k tokens is chosen, given scores or features. Pure tensor functions."""

from __future__ import annotations

import math

import torch

from .view import ImageLayout, Selection


def top_k(scores: torch.Tensor, k: int) -> Selection:
    """The k highest scores (lowest index first on ties), returned in original order."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return Selection(indices=torch.sort(order).values)


def lattice(num_tokens: int, k: int, device: torch.device | str = "cpu") -> Selection:
    """k indices evenly spread over 0..V-1 in raster order: ``round(linspace(0, V-1, k))``."""
    if k == 1:
        return Selection(indices=torch.tensor([(num_tokens - 1) // 2], device=device))
    idx = torch.linspace(0, num_tokens - 1, k, device=device, dtype=torch.float64).round().long()
    return Selection(indices=idx)


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """Split k over parts proportionally to ``sizes`` (largest remainder), never above a part's size."""
    total = sum(sizes)
    raw = [k * s / total for s in sizes]
    out = [min(math.floor(r), s) for r, s in zip(raw, sizes)]
    for i in sorted(range(len(sizes)), key=lambda i: raw[i] - out[i], reverse=True):
        if sum(out) >= k:
            break
        if out[i] < sizes[i]:
            out[i] += 1
    return out


def pooled_grid(rows: int, cols: int, k: int) -> tuple[int, int]:
    """An output grid (r, c) with r*c >= k, r <= rows, c <= cols, aspect close to the input's."""
    r = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    c = min(cols, math.ceil(k / r))
    r = min(rows, math.ceil(k / c))
    return r, c


def adaptive_pool(features: torch.Tensor, layout: ImageLayout, k: int) -> Selection:
    """Average-pool each grid segment to a smaller grid (PyTorch adaptive-pooling windows) so that exactly
    k tokens remain. Each pooled token takes the place (and position id) of its window's top-left token.
    The budget is split over segments by size; when a pooled grid has more than its share of cells, cells
    are dropped evenly in raster order. Newline tokens (LLaVA-NeXT) are kept only when k exceeds the grid
    tokens: then every grid token stays unpooled and the rest of the budget goes to newline tokens spread
    evenly in raster order (``lattice``), so every k <= V is met and k = V keeps everything unchanged."""
    grids = layout.grid_tokens()
    grid = torch.cat([idx.reshape(-1) for _, idx in grids])
    if k >= grid.numel():
        newline = torch.ones(layout.size, dtype=torch.bool)
        newline[grid] = False
        newline = newline.nonzero().flatten()
        extra = newline[lattice(newline.numel(), k - grid.numel()).indices] if k > grid.numel() else newline[:0]
        return Selection(indices=torch.sort(torch.cat([grid, extra])).values.to(features.device))
    shares = split_budget(k, [idx.numel() for _, idx in grids])
    kept_idx, kept_emb = [], []
    for (_, idx), share in zip(grids, shares):
        if share == 0:
            continue
        rows, cols = idx.shape
        r, c = pooled_grid(rows, cols, share)
        cells = [(i, j) for i in range(r) for j in range(c)]
        if len(cells) > share:
            keep = lattice(len(cells), share).indices.tolist()
            cells = [cells[t] for t in keep]
        for i, j in cells:
            r0, r1 = (i * rows) // r, -((-(i + 1) * rows) // r)
            c0, c1 = (j * cols) // c, -((-(j + 1) * cols) // c)
            window = idx[r0:r1, c0:c1].reshape(-1).to(features.device)
            kept_idx.append(window[0])
            kept_emb.append(features[window].mean(0))
    indices = torch.stack(kept_idx)
    order = torch.argsort(indices)
    return Selection(indices=indices[order], embeddings=torch.stack(kept_emb)[order])
