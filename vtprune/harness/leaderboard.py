"""Leaderboard tables from a results file: ``leaderboard.csv`` (every number at full precision, one row per cell)
and ``leaderboard.md`` (per model and task, methods ranked by accuracy retention at each keep budget, and across
model/task pairs how stable the methods' ranking is), plus the plots of :mod:`.plots`. Every number in a table comes
straight from a stored record; only the ranking-stability correlations, and the mean ± std of seeds that
``aggregate_seeds`` merges on request, are computed from them.

Every distinct setting is its own row: an int budget (tokens) and a float one (a fraction) differ even when equal
as numbers, and so do two entries differing only in options or seed; a row's ``label`` is its method name plus
whatever tells it apart from other rows of that method (``seed=1``, ``sweep_seed=2``, an option, the site).
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..benchmark import si_flops
from .cells import BASELINE
from .plots import write_plots
from .records import group_columns, group_value
from .store import read_records

#: CSV column -> how to read it from a record
COLUMNS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "model": lambda r: r["model"],
    "task": lambda r: r["task"],
    "metric": lambda r: r["metrics"]["metric"],
    "method": lambda r: r["method"],
    "label": lambda r: r["label"],
    "pruner": lambda r: r["pruner"],
    "keep": lambda r: r["keep"],
    "site": lambda r: r["site"],
    "layer": lambda r: r["layer"],
    "positions": lambda r: r.get("positions"),
    "options": lambda r: json.dumps(r.get("options") or {}, sort_keys=True),
    "seed": lambda r: r.get("seed"),
    "seeds": lambda r: r.get("seeds", {}).get("n"),
    "n": lambda r: r["metrics"]["n"],
    "score": lambda r: r["metrics"]["score"],
    "score_std": lambda r: r.get("seeds", {}).get("std", {}).get("score"),
    "retention": lambda r: r["retention"]["score"],
    "retention_std": lambda r: r.get("seeds", {}).get("std", {}).get("retention"),
    "visual_before": lambda r: r["visual_tokens"]["visual_before"],
    "visual_after": lambda r: r["visual_tokens"]["visual_after"],
    "kept_ratio": lambda r: r["visual_tokens"]["kept_ratio"],
    "fastv_flops": lambda r: r["flops"]["fastv"],
    "prefill_flops": lambda r: r["flops"]["prefill"],
    "fastv_ratio": lambda r: r["flops"]["fastv_ratio"],
    "prefill_ratio": lambda r: r["flops"]["prefill_ratio"],
    "overhead_flops": lambda r: r["flops"]["overhead"],
    "prefill_ms": lambda r: r["latency"]["prefill_ms"],
    "prefill_speedup": lambda r: r["latency"]["prefill_speedup"],
    "e2e_ms": lambda r: r["latency"]["e2e_ms"],
    "e2e_speedup": lambda r: r["latency"]["e2e_speedup"],
    "overhead_ms": lambda r: r["latency"]["overhead_ms"],
    "overhead_share": lambda r: r["latency"]["overhead_share"],
    "batch_size": lambda r: r["latency"]["batch_size"],
    "peak_bytes": lambda r: r["memory"].get("peak_bytes"),
    "cell": lambda r: r["cell"],
}


def budget_key(keep: float | int) -> tuple[int, float]:
    """Budgets in display order: fractions (largest first), then token counts (largest first); ``1`` (one token)
    and ``1.0`` (every token) are different budgets."""
    return (0 if isinstance(keep, float) else 1, -float(keep))


def entry_key(record: dict[str, Any], seeds: bool = True) -> tuple:
    """What one leaderboard row stands for: model, task, method, budget, site, layer, positions, options and sweep
    seed (a rerun with changed data, model or generation settings replaces the older row); ``seeds=False`` leaves
    out the seeds (the sweep's and ``options.seed``), so the seeds of one setting share a key."""
    options = dict(record.get("options") or {})
    if not seeds:
        options.pop("seed", None)
    keep = record["keep"]
    return (record["model"], record["task"], record["method"], record.get("pruner"),
            None if keep is None else budget_key(keep), record.get("site"), record.get("layer"),
            record.get("positions"), json.dumps(options, sort_keys=True), record.get("seed") if seeds else None)


def _details(record: dict[str, Any]) -> dict[str, Any]:
    """What may tell two rows of one method apart, by how a label names it."""
    return {"sweep_seed": record.get("seed"), **(record.get("options") or {}), "site": record.get("site"),
            "layer": record.get("layer"), "positions": record.get("positions")}


def labelled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` with a ``label``: the method, plus ``name=value`` of each detail (seeds, options, site,
    layer, positions) that differs between rows of that method on the same model and task."""
    peers: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        peers.setdefault((r["model"], r["task"], r["method"]), []).append(_details(r))
    out = []
    for r in rows:
        group = peers[(r["model"], r["task"], r["method"])]
        names = dict.fromkeys(k for d in group for k in d)
        differ = [k for k in names if len({json.dumps(d.get(k), sort_keys=True) for d in group}) > 1]
        mine = _details(r)
        shown = [f"{k}={mine[k]}" for k in differ if mine.get(k) is not None]
        out.append({**r, "label": " ".join([r["method"], *shown])})
    return out


def latest_ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last successful record of every leaderboard row, in first-seen order, labelled (:func:`labelled`)."""
    latest: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("status") == "ok":
            latest[entry_key(r)] = r
    return labelled(list(latest.values()))


#: the measured parts of a record, averaged when seeds are merged
MEASURED = ("metrics", "retention", "visual_tokens", "flops", "latency", "memory")
#: the parts naming the setting, the same for every seed merged
IDENTITY = ("schema", "status", "sweep", "model", "task", "method", "pruner", "keep", "site", "layer", "positions")


def _mean(values: list[Any]) -> Any:
    """A value every member shares as is; numbers averaged, dicts key by key; ``None`` where members disagree
    otherwise (or one lacks the value)."""
    if all(v == values[0] and type(v) is type(values[0]) for v in values):
        return values[0]
    if all(isinstance(v, dict) for v in values):
        return {k: _mean([v.get(k) for v in values]) for k in dict.fromkeys(k for v in values for k in v)}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return statistics.fmean(values)
    return None


def _std(values: list[float | None]) -> float | None:
    """Sample standard deviation; ``None`` below two values or when one is missing."""
    return statistics.stdev(values) if len(values) > 1 and None not in values else None


def aggregate_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows differing only in seed (the sweep's or ``options.seed``) merged into one: every measured number is the
    mean over the seeds; ``seeds`` holds ``n``, the seeds, the cells and the sample std of score and retention.
    Only on request (``vtprune leaderboard --aggregate-seeds``): by default every cell is its own row."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(entry_key(r, seeds=False), []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        row = {k: first.get(k) for k in IDENTITY}
        row.update({k: _mean([m[k] for m in members]) for k in MEASURED})
        row.update({
            "cell": "+".join(m["cell"] for m in members), "seed": None,
            "options": {k: v for k, v in (first.get("options") or {}).items() if k != "seed"},
            "seeds": {"n": len(members), "cells": [m["cell"] for m in members],
                      "values": [{"sweep": m.get("seed"), "options": (m.get("options") or {}).get("seed")}
                                 for m in members],
                      "std": {"score": _std([m["metrics"]["score"] for m in members]),
                              "retention": _std([m["retention"]["score"] for m in members])}}})
        out.append(row)
    return labelled(out)


def csv_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``leaderboard.csv``: fixed columns, then ``score[kind:name]`` / ``retention[kind:name]``."""
    groups = group_columns(records)
    header = list(COLUMNS) + [f"{what}[{kind}:{name}]" for kind, name in groups for what in ("score", "retention")]
    rows = [[get(r) for get in COLUMNS.values()]
            + [group_value(r, kind, name, what) for kind, name in groups for what in ("score", "retention")]
            for r in records]
    return header, rows


def ranked(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Methods ranked by retention (missing last), then score, then fewer FLOPs."""
    def key(r: dict[str, Any]) -> tuple:
        ret = r["retention"]["score"]
        flops = r["flops"]["fastv"]
        return (ret is None, -(ret or 0.0), -r["metrics"]["score"], flops if flops is not None else float("inf"))
    return sorted(records, key=key)


def group_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Row order of the per-group tables: the baseline first, then by method, then budget (display order)."""
    return sorted(records, key=lambda r: (r["keep"] is not None, r["label"],
                                          budget_key(r["keep"]) if r["keep"] is not None else 0))


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks (as Spearman's ρ needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's ρ (Pearson correlation of average ranks); ``None`` below 3 points or when either side is constant,
    where the ordering says nothing."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs equal lengths, got {len(xs)} and {len(ys)}")
    if len(xs) < 3:
        return None
    rx, ry = average_ranks(xs), average_ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if vx == 0 or vy == 0 else cov / (vx * vy) ** 0.5


#: pruners that are references (they know the answer's location), not methods: never ranked against methods
REFERENCE_PRUNERS = frozenset({"informed"})


def pruned_scores(records: list[dict[str, Any]]) -> dict[tuple[str, tuple[int, float]], float]:
    """(label, budget key) -> score of the pruning methods' rows (the baseline and informed references have no rank
    among the methods)."""
    return {(r["label"], budget_key(r["keep"])): r["metrics"]["score"] for r in records
            if r["method"] != BASELINE and r.get("pruner") not in REFERENCE_PRUNERS and r["keep"] is not None
            and r["metrics"]["score"] is not None}


def stability_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of the ranking-stability table: for every two (model, task) pairs, ρ of the methods' scores at each
    shared budget, then over all their common (method, keep) entries."""
    pairs = list(dict.fromkeys((r["model"], r["task"]) for r in records))
    scores = {p: pruned_scores([r for r in records if (r["model"], r["task"]) == p]) for p in pairs}
    keeps = {budget_key(r["keep"]): r["keep"] for r in records if r["keep"] is not None}
    rows = []
    for a, b in itertools.combinations(pairs, 2):
        common = sorted(scores[a].keys() & scores[b].keys(), key=lambda mk: (mk[1], mk[0]))
        budgets = sorted({budget for _, budget in common})
        subsets = [(f"{keeps[k]}", [mk for mk in common if mk[1] == k]) for k in budgets] + [("all budgets", common)]
        for keep, entries in subsets:
            rho = spearman([scores[a][mk] for mk in entries], [scores[b][mk] for mk in entries])
            rows.append([" · ".join(a), " · ".join(b), keep, str(len(entries)), fmt_score(rho)])
    return rows


# ---- formatting (shared with the tests, which check the markdown against the records) ----------------------
def fmt_score(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def fmt_flops(v: float | None) -> str:
    return "n/a" if v is None else si_flops(v)


def fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_keep(keep: float | int) -> str:
    return f"{keep:g} of the visual tokens" if isinstance(keep, float) else f"{keep} tokens per image"


def fmt_tokens(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def fmt_spread(text: str, std: float | None, fmt: Callable[[float | None], str], n: int | None) -> str:
    """A mean as ``mean ± std (n=N)`` for a row merged from N seeds, else the number as is."""
    if n is None:
        return text
    return f"{text} ± {fmt(std)} (n={n})" if std is not None else f"{text} (n={n})"


def method_row(rank: int | str, r: dict[str, Any]) -> list[str]:
    """One markdown table row of a leaderboard row."""
    lat, flops = r["latency"], r["flops"]
    overhead = f"{fmt_ms(lat['overhead_ms'])} ms ({fmt_pct(lat['overhead_share'])})"
    seeds = r.get("seeds", {})
    std, n = seeds.get("std", {}), seeds.get("n")
    return [str(rank), r["label"], fmt_spread(fmt_score(r["metrics"]["score"]), std.get("score"), fmt_score, n),
            fmt_spread(fmt_pct(r["retention"]["score"]), std.get("retention"), fmt_pct, n),
            fmt_tokens(r["visual_tokens"]["visual_after"]), fmt_flops(flops["fastv"]), fmt_flops(flops["prefill"]),
            fmt_ms(lat["prefill_ms"]), fmt_x(lat["prefill_speedup"]), overhead]


HEADER = ["rank", "method", "score", "retention", "visual tokens", "FastV FLOPs", "exact FLOPs", "prefill ms",
          "prefill speedup", "overhead"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def group_table(records: list[dict[str, Any]], what: str) -> list[str]:
    """Markdown table of every record's score (``what="score"``, after its overall score) or retention per
    category and tag, one row per record in :func:`group_order`."""
    groups = group_columns(records)
    overall = ["all"] if what == "score" else []
    header = ["method", "keep", *overall] + [name if kind == "category" else f"tag:{name}" for kind, name in groups]
    rows = [[r["label"], "all" if r["keep"] is None else f"{r['keep']}"]
            + ([fmt_pct(r["metrics"]["score"])] if what == "score" else [])
            + [fmt_pct(group_value(r, kind, name, what)) for kind, name in groups]
            for r in group_order(records)]
    return _table(header, rows)


def markdown(records: list[dict[str, Any]], failed: list[dict[str, Any]], source: Path) -> str:
    """``leaderboard.md`` of leaderboard rows: per model and task, the baseline, a ranked table per budget, accuracy
    and retention by group; then how stable the methods' ranking is across model/task pairs."""
    records = labelled(records)
    merged = sum(r["seeds"]["n"] for r in records if "seeds" in r)
    what = (f"{len(records)} row(s) merged from {merged} successful cell(s): seeds of one setting as mean ± sample "
            "std (n = seeds)" if merged else f"{len(records)} successful cell(s)")
    lines = ["# vtprune leaderboard", "",
             f"From `{source}`: {what}, {len(failed)} failed.", "",
             "Retention = score ÷ the unpruned score of the same model and task. FLOPs are per question, prefill "
             "only: FastV convention (LLM layers, 4nd²+2n²d+2ndm) and exact (vision, projector, LLM, LM head, "
             "pruner overhead). Prefill = measured time to first token per batch (median); speedup = unpruned "
             "prefill ÷ this prefill. Overhead = the pruner's selection time per batch (share of prefill).", ""]
    pairs = list(dict.fromkeys((r["model"], r["task"]) for r in records))
    for model, task in pairs:
        mine = [r for r in records if (r["model"], r["task"]) == (model, task)]
        bases = [r for r in mine if r["keep"] is None]
        lines += [f"## {model} · {task} ({mine[0]['metrics']['metric']}, n={mine[0]['metrics']['n']})", ""]
        if bases:
            lines += _table(HEADER, [method_row("-", base) for base in bases]) + [""]
        keeps = {budget_key(r["keep"]): r["keep"] for r in mine if r["keep"] is not None}
        for budget in sorted(keeps):
            lines += [f"### keep {fmt_keep(keeps[budget])}", ""]
            pruned = ranked([r for r in mine if r["keep"] is not None and budget_key(r["keep"]) == budget])
            lines += _table(HEADER, [method_row(i, r) for i, r in enumerate(pruned, 1)]) + [""]
        if group_columns(mine):
            lines += ["### accuracy by category and tag", "", *group_table(mine, "score"), ""]
            lines += ["### retention by category and tag", "", *group_table(mine, "retention"), ""]
    if failed:
        lines += ["## Failed cells", "", *[f"- {r['model']} · {r['task']} · {r['method']} keep={r['keep']}: "
                                           f"`{r['error']}`" for r in failed], ""]
    if len(pairs) >= 2:
        lines += ["## Ranking stability", "",
                  ("Do two models (or tasks) order the pruning methods the same way? Spearman's ρ of the methods' "
                   "scores (baseline and informed references excluded) over the methods both have, per shared "
                   "budget and over every common (method, keep): 1 = same order, -1 = reversed, n/a = fewer than 3 "
                   "common methods or no spread."),
                  "", *_table(["A", "B", "keep", "methods", "Spearman ρ"], stability_rows(records)), ""]
    return "\n".join(lines)


def write_leaderboard(results: str | Path, out: str | Path, flops: str = "fastv", aggregate: bool = False
                      ) -> list[Path]:
    """Write ``leaderboard.md``, ``leaderboard.csv`` and the PNG plots into ``out``; returns the paths. Each row
    (:func:`entry_key`) shows its last successful record, or with ``aggregate`` the mean ± std of its seeds
    (:func:`aggregate_seeds`); failures without a success are listed."""
    source = Path(results)
    records = read_records(source)
    ok = latest_ok(records)
    done = {entry_key(r) for r in ok}
    if aggregate:
        ok = aggregate_seeds(ok)
    failed = list({entry_key(r): r for r in records if r.get("status") == "error" and entry_key(r) not in done}
                  .values())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = csv_rows(ok)
    with open(out / "leaderboard.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else repr(v) if isinstance(v, float) else v for v in row] for row in rows])
    (out / "leaderboard.md").write_text(markdown(ok, failed, source))
    return [out / "leaderboard.md", out / "leaderboard.csv", *write_plots(ok, out, flops=flops)]
