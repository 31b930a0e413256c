"""Leaderboard plots (PNG): accuracy vs FLOPs with each method's Pareto curve, accuracy vs measured prefill time,
and retention vs fraction of visual tokens kept per task category.

One panel per model × task (per category for the last plot); a method keeps its colour and marker in every plot;
the legend sits below the panels so it never covers data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import EngFormatter, PercentFormatter, ScalarFormatter  # noqa: E402

from .cells import BASELINE  # noqa: E402
from .records import group_columns, group_value  # noqa: E402

MARKERS = "osD^vP*Xhp<>"
LEGEND_CHAR_INCHES = 0.085  # width of one legend label character at the default 10 pt font, with margin
LEGEND_MARKER_INCHES = 0.7  # the marker, its padding and the gap to the next column
LEGEND_ROW_INCHES = 0.25  # height of one legend row
FLOPS_LABEL = {"fastv": "FLOPs per question, FastV convention (LLM prefill)",
               "prefill": "FLOPs per question, exact prefill (vision + LLM + overhead)"}


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (fewer FLOPs and higher score), by increasing FLOPs."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _styles(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A fixed colour and marker per row label, i.e. per method setting (the baseline is a black star)."""
    methods = sorted({r["label"] for r in records} - {BASELINE})
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    styles = {m: {"color": cmap(i % cmap.N), "marker": MARKERS[i % len(MARKERS)]} for i, m in enumerate(methods)}
    styles[BASELINE] = {"color": "black", "marker": "*"}
    return styles


def _grid(n: int, ncols_max: int, size: tuple[float, float]) -> tuple[Any, list[Any]]:
    ncols = min(n, ncols_max)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows + 0.3), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _legend(fig: Any, styles: dict[str, dict[str, Any]], used: set[str], panel_cols: int,
            pareto_line: bool = False) -> None:
    """One legend for the figure, below the panels, in as many columns as the longest label lets fit across
    the figure (at most three per panel width); the figure grows by the legend's rows."""
    order = [BASELINE] + sorted(m for m in used if m != BASELINE)
    handles = [Line2D([], [], linestyle="none", markersize=9 if m == BASELINE else 7, label=m, **styles[m])
               for m in order if m in used]
    if pareto_line and handles:
        handles.append(Line2D([], [], color="grey", linestyle="-", label="Pareto front of a method"))
    if handles:
        column_inches = LEGEND_CHAR_INCHES * max(len(h.get_label()) for h in handles) + LEGEND_MARKER_INCHES
        ncol = min(len(handles), 3 * panel_cols, max(1, int(fig.get_figwidth() // column_inches)))
        rows = math.ceil(len(handles) / ncol)
        fig.set_figheight(fig.get_figheight() + LEGEND_ROW_INCHES * rows)  # the panels keep their height
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey", wrap=True)


def _pairs(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["model"], r["task"]) for r in records))


def _accuracy_plot(records: list[dict[str, Any]], path: Path, x_of: Any, xlabel: str, formatter: Any,
                   with_pareto: bool) -> Path:
    styles = _styles(records)
    pairs = _pairs(records)
    fig, axes = _grid(len(pairs), 2, (6.0, 4.2))
    used: set[str] = set()
    for ax, (model, task) in zip(axes, pairs):
        mine = [r for r in records if (r["model"], r["task"]) == (model, task) and x_of(r) is not None]
        for method in sorted({r["label"] for r in mine}):
            pts = [(x_of(r), r["metrics"]["score"]) for r in mine if r["label"] == method]
            used.add(method)
            style = styles[method]
            ax.scatter(*zip(*pts), color=style["color"], marker=style["marker"], s=90 if method == BASELINE else 40,
                       zorder=3, edgecolors="white", linewidths=0.5)
            if method == BASELINE:
                ax.axhline(pts[0][1], color="black", linestyle=":", linewidth=1, zorder=1)
            elif len(pts) > 1:
                line = pareto(pts) if with_pareto else sorted(pts)
                ax.plot(*zip(*line), color=style["color"], linewidth=1.3, alpha=0.85, zorder=2,
                        drawstyle="steps-post" if with_pareto else "default")
        if mine:
            ys = [r["metrics"]["score"] for r in mine]
            pad = max(0.05, 0.12 * (max(ys) - min(ys)))
            ax.set_ylim(max(-0.02, min(ys) - pad), min(1.02, max(ys) + pad))
        else:
            _empty(ax, "no measurements")
        metric = mine[0]["metrics"]["metric"] if mine else ""
        ax.set_title(f"{model} · {task}", fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"accuracy ({metric})")
        ax.xaxis.set_major_formatter(formatter)
        ax.grid(alpha=0.3)
        ax.margins(x=0.08)
    _legend(fig, styles, used, min(len(pairs), 2), pareto_line=with_pareto)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _line_through(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points sorted by x, points sharing an x (e.g. keep=0.25 and keep=4 of 16 tokens) merged into their mean."""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    return [(x, sum(ys) / len(ys)) for x, ys in sorted(by_x.items())]


def _retention_plot(records: list[dict[str, Any]], path: Path, ncols: int = 4) -> Path:
    """A block of panels per model × task: all questions, then each category and tag; x = fraction of visual tokens
    kept, y = retention. Markers are cells; lines join a method's budgets."""
    styles = _styles(records)
    blocks = []
    for model, task in _pairs(records):
        mine = [r for r in records if (r["model"], r["task"]) == (model, task)]
        blocks.append((model, task, mine, [(None, None)] + group_columns(mine)))
    ncols = min(ncols, max(len(groups) for *_, groups in blocks))
    heights = [math.ceil(len(groups) / ncols) for *_, groups in blocks]
    fig = plt.figure(figsize=(4.0 * ncols, 3.3 * sum(heights) + 0.6 * len(blocks) + 0.3), layout="constrained")
    subfigs = fig.subfigures(len(blocks), 1, height_ratios=heights, squeeze=False)[:, 0]
    used: set[str] = set()
    for sub, height, (model, task, mine, groups) in zip(subfigs, heights, blocks):
        sub.suptitle(f"{model} · {task}", fontsize=12, fontweight="bold")
        axes = list(sub.subplots(height, ncols, squeeze=False).flat)
        for ax in axes[len(groups):]:
            ax.set_visible(False)
        for ax, (kind, name) in zip(axes, groups):
            drawn = False
            for method in sorted({r["label"] for r in mine}):
                pts = [(r["visual_tokens"]["kept_ratio"],
                        r["retention"]["score"] if kind is None else group_value(r, kind, name, "retention"))
                       for r in mine if r["label"] == method]
                pts = [(x, y) for x, y in pts if x is not None and y is not None]
                if not pts:
                    continue
                drawn = True
                used.add(method)
                style = styles[method]
                ax.scatter(*zip(*pts), color=style["color"], marker=style["marker"], zorder=3,
                           s=90 if method == BASELINE else 30)
                if len(pts) > 1:
                    ax.plot(*zip(*_line_through(pts)), color=style["color"], linewidth=1.2, alpha=0.85, zorder=2)
            if not drawn:
                _empty(ax, "no retention:\nthe unpruned score\nis 0 or missing")
            ax.set_title("all questions" if kind is None else name if kind == "category" else f"tag: {name}",
                         fontsize=10)
            ax.set_xlabel("fraction of visual tokens kept")
            ax.set_ylabel("retention")
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
            ax.set_xlim(0, 1.05)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.grid(alpha=0.3)
    _legend(fig, styles, used, ncols)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(records: list[dict[str, Any]], out: Path, flops: str = "fastv") -> list[Path]:
    """The three PNGs in ``out``; ``flops`` picks the x axis of the FLOPs plot (``fastv`` or ``prefill``)."""
    if not records:
        return []
    return [
        _accuracy_plot(records, out / "accuracy_vs_flops.png", lambda r: r["flops"][flops], FLOPS_LABEL[flops],
                       EngFormatter(), with_pareto=True),
        _accuracy_plot(records, out / "accuracy_vs_prefill_latency.png", lambda r: r["latency"]["prefill_ms"],
                       "measured prefill (time to first token) per batch, ms", ScalarFormatter(),
                       with_pareto=False),
        _retention_plot(records, out / "retention_by_category.png"),
    ]
