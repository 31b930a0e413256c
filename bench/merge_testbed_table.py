"""Counting and retrieval per method, dropping vs merging (``merge="proportional"``), from a results store of
``bench/merge_testbed.yaml``: one markdown table, the numbers docs/benchmarks.md quotes.

    .venv/bin/python bench/merge_testbed_table.py runs/merge_testbed/results.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MERGED = "merge=proportional"


def _scores(record: dict) -> tuple[float, float, float]:
    """(counting, retrieval, overall) accuracy of one cell."""
    m = record["metrics"]
    return m["per_category"]["counting"]["score"], m["per_tag"]["retrieval"]["score"], m["score"]


def table(path: Path) -> str:
    """The markdown table: one row per method and keep, counting / retrieval / all, dropped -> merged."""
    cells: dict[tuple[str, float | None, bool], tuple[float, float, float]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["status"] != "ok":
            continue
        merged = MERGED in r["method"]
        base = r["method"].replace(f", {MERGED}", "").replace(f" {MERGED}", "")
        cells[base, r["keep"], merged] = _scores(r)
    rows = ["| method | keep | counting (drop → merge) | retrieval (drop → merge) | all (drop → merge) |",
            "|---|---|---|---|---|"]
    for (base, keep, merged), drop in sorted(cells.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 2))):
        if merged:
            continue
        merge = cells.get((base, keep, True))
        parts = [f"{d:.1%} → {m:.1%}" if merge else f"{d:.1%}" for d, m in zip(drop, merge or drop)]
        rows.append(f"| {base} | {'' if keep is None else keep} | " + " | ".join(parts) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    print(table(parser.parse_args().results))


if __name__ == "__main__":
    main()
