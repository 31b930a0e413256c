"""bench/merge_testbed_table.py: dropping vs merging rows from a results store (plumbing only)."""

from __future__ import annotations

import json

from bench_scripts import bench_script


def _record(method: str, keep: float | None, counting: float, retrieval: float, score: float) -> dict:
    return {"status": "ok", "method": method, "keep": keep,
            "metrics": {"score": score, "per_category": {"counting": {"score": counting}},
                        "per_tag": {"retrieval": {"score": retrieval}}}}


def test_table_pairs_each_dropping_cell_with_its_merging_twin(tmp_path):
    records = [_record("unpruned", None, 0.8, 0.99, 0.95), _record("divprune", 0.25, 0.4, 0.9, 0.8),
               _record("divprune merge=proportional", 0.25, 0.6, 0.95, 0.85),
               _record("[ref] informed: q, merge=proportional", 0.5, 0.7, 0.97, 0.9),
               _record("[ref] informed: q", 0.5, 0.5, 0.96, 0.88), {"status": "failed", "method": "x", "keep": 0.5}]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    with bench_script("merge_testbed_table") as script:
        rows = script.table(path).splitlines()
    assert "| divprune | 0.25 | 40.0% → 60.0% | 90.0% → 95.0% | 80.0% → 85.0% |" in rows
    assert "| [ref] informed: q | 0.5 | 50.0% → 70.0% | 96.0% → 97.0% | 88.0% → 90.0% |" in rows
    assert "| unpruned |  | 80.0% | 99.0% | 95.0% |" in rows
    assert len(rows) == 5  # header, rule, three methods; the failed cell is skipped
