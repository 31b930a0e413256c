"""``leaderboard.md`` on hand-made records: the accuracy-by-group table shows each record's scores, and the ranking-
stability section holds Spearman's ρ computed by hand (average ranks for ties)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vtprune.harness import leaderboard as L
from vtprune.harness.cells import BASELINE


def record(model: str, task: str, method: str, keep: float | int | None, score: float,
           per_category: dict[str, float] | None = None, per_tag: dict[str, float] | None = None) -> dict[str, Any]:
    """A successful results record with the fields the leaderboard reads (retention set equal to the scores)."""
    cats, tags = per_category or {}, per_tag or {}
    ratio = 1.0 if keep is None else float(keep) if isinstance(keep, float) else keep / 64
    return {
        "model": model, "task": task, "method": method, "pruner": None if method == BASELINE else method,
        "keep": keep, "site": "vision", "layer": None, "status": "ok", "cell": f"{model}-{task}-{method}-{keep}",
        "metrics": {"metric": "accuracy", "n": 8, "score": score,
                    "per_category": {k: {"score": v, "n": 4} for k, v in cats.items()},
                    "per_tag": {k: {"score": v, "n": 4} for k, v in tags.items()}},
        "retention": {"score": score, "per_category": dict(cats), "per_tag": dict(tags)},
        "visual_tokens": {"visual_before": 64, "visual_after": 64 * ratio, "kept_ratio": ratio},
        "flops": {"fastv": 1e9 * ratio, "prefill": 2e9 * ratio, "fastv_ratio": ratio, "prefill_ratio": ratio,
                  "overhead": 0.0},
        "latency": {"prefill_ms": 10.0, "prefill_speedup": 1.0, "e2e_ms": 20.0, "e2e_speedup": 1.0,
                    "overhead_ms": 0.0, "overhead_share": 0.0, "batch_size": 4},
        "memory": {},
    }


def section(text: str, title: str) -> str:
    """The markdown from heading ``title`` up to the next heading."""
    return text.split(title, 1)[1].split("\n#", 1)[0]


# ---- Spearman -----------------------------------------------------------------------------------------------
def test_average_ranks_share_the_mean_rank_between_ties():
    assert L.average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert L.average_ranks([7, 7, 7]) == [2.0, 2.0, 2.0]
    assert L.average_ranks([]) == []


def test_spearman_matches_hand_computed_values():
    assert L.spearman([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert L.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert L.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6·2 / (3·8)
    # ties: ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4] -> cov 4.5, variances 4.5 and 5 -> 3/√10
    assert L.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / 10 ** 0.5)
    assert L.spearman([0.1, 0.5, 0.9], [10, 20, 30]) == pytest.approx(1.0)  # only the order counts


def test_spearman_is_none_without_enough_points_or_spread():
    assert L.spearman([], []) is None
    assert L.spearman([1, 2], [2, 1]) is None
    assert L.spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError):
        L.spearman([1, 2, 3], [1, 2])


# ---- markdown -----------------------------------------------------------------------------------------------
#: (method, keep) -> score on model m1 and m2 (same task): at 0.5 the same order, at 0.25 reversed, at 0.75 only
#: two common methods, 0.1 only on m1, d has no 0.25 on m2
SCORES = {
    "m1": {("a", 0.75): 0.9, ("b", 0.75): 0.85, ("a", 0.5): 0.8, ("b", 0.5): 0.6, ("c", 0.5): 0.4, ("d", 0.5): 0.2,
           ("a", 0.25): 0.5, ("b", 0.25): 0.4, ("c", 0.25): 0.3, ("d", 0.25): 0.35, ("a", 0.1): 0.1,
           ("b", 0.1): 0.2, ("c", 0.1): 0.3},
    "m2": {("a", 0.75): 0.9, ("b", 0.75): 0.95, ("a", 0.5): 0.7, ("b", 0.5): 0.5, ("c", 0.5): 0.3, ("d", 0.5): 0.1,
           ("a", 0.25): 0.1, ("b", 0.25): 0.2, ("c", 0.25): 0.3},
}


@pytest.fixture
def records() -> list[dict[str, Any]]:
    """A baseline and the SCORES records per model, m1 with category/tag scores (one category missing on one)."""
    out = []
    for model, scores in SCORES.items():
        out.append(record(model, "shapes", BASELINE, None, 0.9, {"colour": 1.0, "shape": 0.8}, {"small": 0.875}))
        for (method, keep), score in scores.items():
            out.append(record(model, "shapes", method, keep, score, {"colour": score, "shape": score / 2},
                              {"small": 0.25}))
    gap = next(r for r in out if (r["model"], r["method"], r["keep"]) == ("m1", "a", 0.5))
    gap["metrics"]["per_category"].pop("shape")  # m1 · a @ 0.5 had no "shape" question
    gap["retention"]["per_category"].pop("shape")
    return out


def test_accuracy_table_shows_the_overall_and_group_scores(records):
    text = L.markdown(records, [], Path("results.jsonl"))
    m1 = text.split("## m1 · shapes")[1].split("## m2 · shapes")[0]
    assert m1.index("### accuracy by category and tag") < m1.index("### retention by category and tag")
    acc = section(m1, "### accuracy by category and tag")
    assert "| method | keep | all | colour | shape | tag:small |" in acc
    assert "| unpruned | all | 90.0% | 100.0% | 80.0% | 87.5% |" in acc
    assert "| a | 0.5 | 80.0% | 80.0% | n/a | 25.0% |" in acc
    assert "| c | 0.25 | 30.0% | 30.0% | 15.0% | 25.0% |" in acc
    rows = [line.split(" | ")[:2] for line in acc.splitlines() if line.startswith("| ") and "method" not in line]
    ret = section(m1, "### retention by category and tag")
    assert rows == [line.split(" | ")[:2] for line in ret.splitlines()
                    if line.startswith("| ") and "method" not in line]  # same row order in both tables
    # the baseline, then by method, each from the largest budget down
    assert rows == [["| unpruned", "all"], ["| a", "0.75"], ["| a", "0.5"], ["| a", "0.25"], ["| a", "0.1"],
                    ["| b", "0.75"], ["| b", "0.5"], ["| b", "0.25"], ["| b", "0.1"], ["| c", "0.5"], ["| c", "0.25"],
                    ["| c", "0.1"], ["| d", "0.5"], ["| d", "0.25"]]
    assert "| a | 0.5 | 80.0% | n/a | 25.0% |" in ret  # retention keeps its columns (no "all")


def test_ranking_stability_holds_spearman_per_shared_budget_and_over_all(records):
    text = L.markdown(records, [], Path("results.jsonl"))
    assert text.rstrip().splitlines()[-1].startswith("| ")  # the final section
    stab = section(text, "## Ranking stability")
    assert "same order" in stab
    assert "| A | B | keep | methods | Spearman ρ |" in stab
    assert "| m1 · shapes | m2 · shapes | 0.75 | 2 | n/a |" in stab  # fewer than 3 common methods
    assert "| m1 · shapes | m2 · shapes | 0.5 | 4 | 1.000 |" in stab
    assert "| m1 · shapes | m2 · shapes | 0.25 | 3 | -1.000 |" in stab
    assert "| m1 · shapes | m2 · shapes | 0.1 |" not in stab  # not a shared budget
    assert BASELINE not in stab
    # all 9 common entries; m1 ranks 9 8 7 6 3.5 1 5 3.5 2, m2 ranks 8 9 7 6 4.5 1.5 1.5 3 4.5 (mean 5 both)
    # -> cov 48.25, variances 59.5 and 59: ρ = 48.25 / √(59.5 · 59) = 0.8144
    assert "| m1 · shapes | m2 · shapes | all budgets | 9 | 0.814 |" in stab
    table = [line for line in stab.splitlines() if line.startswith("| m1")]
    assert len(table) == 4 and table[-1].split(" | ")[2] == "all budgets"


def test_ranking_stability_compares_every_two_pairs_and_needs_two(records):
    only_m1 = [r for r in records if r["model"] == "m1"]
    assert "## Ranking stability" not in L.markdown(only_m1, [], Path("results.jsonl"))
    third = [dict(r, task="colours") for r in only_m1]
    stab = section(L.markdown(records + third, [], Path("results.jsonl")), "## Ranking stability")
    assert "| m1 · shapes | m1 · colours | 0.1 | 3 | 1.000 |" in stab  # identical scores: same order everywhere
    assert "| m1 · shapes | m1 · colours | all budgets | 13 | 1.000 |" in stab
    assert "| m2 · shapes | m1 · colours | 0.5 | 4 | 1.000 |" in stab
    assert {tuple(line.split(" | ")[:2]) for line in stab.splitlines() if line.startswith("| m")} == \
        {("| m1 · shapes", "m2 · shapes"), ("| m1 · shapes", "m1 · colours"), ("| m2 · shapes", "m1 · colours")}


def test_informed_references_are_not_ranked_among_methods(records):
    """A reference (pruner ``informed``) with opposite orders on the two models leaves ρ unchanged."""
    refs = [dict(record(m, "shapes", "[ref] informed", 0.5, s), pruner="informed")
            for m, s in (("m1", 1.0), ("m2", 0.0))]
    stab = section(L.markdown(records + refs, [], Path("results.jsonl")), "## Ranking stability")
    assert "| m1 · shapes | m2 · shapes | 0.5 | 4 | 1.000 |" in stab
