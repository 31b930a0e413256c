"""Distinct cells stay distinct: ``keep: [1, 1.0]`` is two budgets (one token, every token) in the grid, the cell
hashes and the leaderboard; entries differing only in options or seed are separate, labelled leaderboard rows, merged
only on request (``--aggregate-seeds``: mean ± std with n); the committed old records still read."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from vtprune.cli import main
from vtprune.harness import leaderboard as L
from vtprune.harness.cells import expand
from vtprune.harness.schema import TaskSpec, load_config
from vtprune.harness.store import read_records
from vtprune.harness.synthetic import write_shapes_task
from vtprune.harness.tasks import load_task

REPO = Path(__file__).resolve().parents[2]
BASE = {"models": [{"tiny": "llava"}], "tasks": [{"synthetic": "shapes", "size": 4}]}


def rec(method: str, keep: float | int | None, score: float, seed: int = 0, options: dict | None = None,
        positions: str = "original", retention: float | None = None) -> dict[str, Any]:
    """A successful record with the fields the leaderboard reads."""
    return {
        "status": "ok", "cell": f"{method}-{keep!r}-{seed}-{options}-{positions}-{score}", "model": "m", "task": "t",
        "method": method, "pruner": None if keep is None else method.split()[0], "keep": keep,
        "site": None if keep is None else "pre_llm", "layer": None, "positions": None if keep is None else positions,
        "options": options or {}, "seed": seed,
        "metrics": {"metric": "exact_match", "n": 4, "score": score, "per_category": {}, "per_tag": {}},
        "retention": {"score": score if retention is None else retention, "per_category": {}, "per_tag": {}},
        "visual_tokens": {"visual_before": 16, "visual_after": 8, "kept_ratio": 0.5},
        "flops": {"fastv": 1e9, "prefill": 2e9, "fastv_ratio": 0.5, "prefill_ratio": 0.5, "overhead": 0.0},
        "latency": {"prefill_ms": 10.0, "prefill_speedup": 1.0, "e2e_ms": 20.0, "e2e_speedup": 1.0,
                    "overhead_ms": 0.0, "overhead_share": 0.0, "batch_size": 1},
        "memory": {},
    }


def section(text: str, title: str) -> str:
    """The markdown from heading ``title`` up to the next heading."""
    return text.split(title, 1)[1].split("\n#", 1)[0]


def test_an_int_and_a_float_budget_of_equal_value_are_two_grid_points_and_cells(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "pruners": [{"name": "uniform", "keep": [1, 1.0, 0.5, 1]}]}))
    config = load_config(path)
    keeps = [point["keep"] for point in config.pruners[0].grid()]
    assert keeps == [1, 1.0, 0.5] and [type(k) for k in keeps] == [int, float, float]
    task = load_task(TaskSpec(synthetic="shapes", size=4), write_shapes_task(tmp_path / "t", 4))
    cells = expand(config, [task])
    assert [c.label for c in cells] == ["tiny-llava | shapes-4 | unpruned", "tiny-llava | shapes-4 | uniform keep=1",
                                        "tiny-llava | shapes-4 | uniform keep=1.0",
                                        "tiny-llava | shapes-4 | uniform keep=0.5"]
    assert len({c.hash for c in cells}) == 4


def test_budgets_equal_as_numbers_get_their_own_rows_and_sections():
    rows = L.latest_ok([rec("unpruned", None, 0.8), rec("uniform", 1, 0.2), rec("uniform", 1.0, 0.9)])
    assert [(r["keep"], r["metrics"]["score"]) for r in rows] == [(None, 0.8), (1, 0.2), (1.0, 0.9)]
    text = L.markdown(rows, [], Path("results.jsonl"))
    tokens, fraction = section(text, "### keep 1 tokens per image"), section(text, "### keep 1 of the visual tokens")
    assert "| 1 | uniform | 0.200 |" in tokens and "0.900" not in tokens
    assert "| 1 | uniform | 0.900 |" in fraction and "0.200" not in fraction


def test_entries_differing_only_in_a_pruner_seed_are_separate_labelled_rows():
    records = [rec("unpruned", None, 0.8), rec("random", 0.5, 0.4, options={"seed": 1}),
               rec("random", 0.5, 0.6, options={"seed": 2}), rec("random", 0.25, 0.3, options={"seed": 1}),
               rec("uniform", 0.5, 0.7)]
    rows = L.latest_ok(records)
    assert [r["label"] for r in rows] == ["unpruned", "random seed=1", "random seed=2", "random seed=1", "uniform"]
    half = section(L.markdown(rows, [], Path("results.jsonl")), "### keep 0.5 of the visual tokens")
    assert "| 1 | uniform | 0.700 |" in half and "| 2 | random seed=2 | 0.600 |" in half
    assert "| 3 | random seed=1 | 0.400 |" in half


def test_sweeps_with_different_seeds_keep_their_own_rows_and_a_rerun_replaces_its_row():
    records = [rec("unpruned", None, 0.8, seed=0), rec("random", 0.5, 0.4, seed=0),
               rec("unpruned", None, 0.7, seed=1), rec("random", 0.5, 0.5, seed=1),
               rec("random", 0.5, 0.45, seed=0)]  # seed 0 rerun: replaces the first random row
    rows = L.latest_ok(records)
    assert [(r["label"], r["metrics"]["score"]) for r in rows] == [
        ("unpruned sweep_seed=0", 0.8), ("random sweep_seed=0", 0.45), ("unpruned sweep_seed=1", 0.7),
        ("random sweep_seed=1", 0.5)]
    text = L.markdown(rows, [], Path("results.jsonl"))
    assert "| - | unpruned sweep_seed=0 | 0.800 |" in text and "| - | unpruned sweep_seed=1 | 0.700 |" in text


def test_aggregating_merges_only_seeds_into_mean_std_and_n(tmp_path, capsys):
    records = [rec("unpruned", None, 0.8),
               *(rec("random", 0.5, s, options={"seed": i}, retention=r)
                 for i, (s, r) in enumerate([(0.4, 0.5), (0.6, 0.75), (0.8, 1.0)])),
               rec("random", 0.5, 0.2, options={"seed": 0}, positions="compact"),  # another setting: its own row
               rec("uniform", 1, 0.3)]
    rows = L.aggregate_seeds(L.latest_ok(records))
    assert [(r["method"], r["positions"], r["seeds"]["n"]) for r in rows] == [
        ("unpruned", None, 1), ("random", "original", 3), ("random", "compact", 1), ("uniform", "original", 1)]
    merged = rows[1]
    # scores 0.4, 0.6, 0.8: mean 0.6, sample std 0.2; retention 0.5, 0.75, 1.0: mean 0.75, sample std 0.25
    assert merged["metrics"]["score"] == pytest.approx(0.6) and merged["retention"]["score"] == pytest.approx(0.75)
    assert merged["seeds"]["std"]["score"] == pytest.approx(0.2)
    assert merged["seeds"]["std"]["retention"] == pytest.approx(0.25)
    assert merged["options"] == {} and merged["seed"] is None and merged["keep"] == 0.5
    assert [v["options"] for v in merged["seeds"]["values"]] == [0, 1, 2]
    assert rows[3]["keep"] == 1 and isinstance(rows[3]["keep"], int)
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["leaderboard", str(results), "--out", str(tmp_path / "agg"), "--aggregate-seeds"]) == 0
    text = (tmp_path / "agg" / "leaderboard.md").read_text()
    assert "| random positions=original | 0.600 ± 0.200 (n=3) | 75.0% ± 25.0% (n=3) |" in text
    assert "| random positions=compact | 0.200 (n=1) |" in text
    with open(tmp_path / "agg" / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["seeds"] for row in table] == ["1", "3", "1", "1"]
    assert float(table[1]["score"]) == pytest.approx(0.6) and float(table[1]["score_std"]) == pytest.approx(0.2)
    assert main(["leaderboard", str(results), "--out", str(tmp_path / "all")]) == 0  # the default: every cell a row
    with open(tmp_path / "all" / "leaderboard.csv") as f:
        assert len(list(csv.DictReader(f))) == len(records)


def test_the_committed_records_still_read_one_row_per_cell():
    rows = L.latest_ok(read_records(REPO / "eval" / "leaderboard" / "results.jsonl"))
    with open(REPO / "eval" / "leaderboard" / "leaderboard.csv") as f:
        committed = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == [row["cell"] for row in committed]
    assert [r["label"] for r in rows] == [row["method"] for row in committed]  # nothing to tell apart: names stay
    assert "## Ranking stability" in L.markdown(rows, [], Path("results.jsonl"))
