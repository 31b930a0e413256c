"""``vtprune leaderboard``: every number in leaderboard.csv / leaderboard.md is the stored record's, methods are ranked
by retention within each budget, and the three plots are written."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml
from test_leaderboard_testbed import record

from vtprune.cli import main
from vtprune.harness.cells import BASELINE
from vtprune.harness.store import ResultsStore


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A sweep on a task whose answers are half the tiny model's own unpruned answers (so scores and retention
    are not all zero): a baseline-only sweep first, then the task rewritten, then the real sweep."""
    root = tmp_path_factory.mktemp("lb")
    first = {"name": "probe", "models": [{"tiny": "qwen2_vl", "batch_size": 4}],
             "tasks": [{"synthetic": "shapes", "size": 8}], "generation": {"max_new_tokens": 1}}
    (root / "probe.yaml").write_text(yaml.safe_dump(first))
    assert main(["sweep", str(root / "probe.yaml"), "--out", str(root / "probe"), "--no-progress",
                 "--no-leaderboard"]) == 0
    record = ResultsStore(root / "probe" / "results.jsonl").records()[0]
    lines = (root / "probe" / record["predictions"]).read_text().splitlines()
    said = [json.loads(line)["prediction"] for line in lines]
    task = root / "task"
    shutil.copytree(root / "probe" / "tasks" / "shapes-8-seed-0", task)
    rows = [json.loads(line) for line in (task / "data.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["answer"] = said[i] if i % 2 == 0 else "zzz"
    (task / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sweep = {"name": "lb", "models": [{"tiny": "qwen2_vl", "batch_size": 4}], "tasks": [{"path": str(task)}],
             "pruners": [{"name": "uniform", "keep": [0.5, 0.25]}, {"name": "random", "keep": [0.5, 0.25]},
                         {"name": "pool", "keep": 0.5, "site": "layer", "layer": 9}],
             "generation": {"max_new_tokens": 1}}
    (root / "lb.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(root / "lb.yaml"), "--out", str(root / "out"), "--no-progress"]) == 1  # K=9 fails
    torch.set_num_threads(1)
    return root / "out"


def test_a_sweeps_leaderboard_has_one_row_per_successful_cell(results):
    records = ResultsStore(results / "results.jsonl").records()
    ok = [r for r in records if r["status"] == "ok"]
    with open(results / "leaderboard" / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["method"], row["keep"]) for row in rows] == [
        ("unpruned", ""), ("uniform", "0.5"), ("uniform", "0.25"), ("random", "0.5"), ("random", "0.25")]
    assert (rows[0]["score"], rows[0]["retention"]) == ("0.5", "1.0")  # the baseline matches its own answers
    assert [float(row["score"]) for row in rows] == [r["metrics"]["score"] for r in ok]
    assert "score[category:colour]" in rows[0]
    text = (results / "leaderboard" / "leaderboard.md").read_text()
    assert "## Failed cells" in text and "pool K=9 keep=0.5" in text and "out of range" in text
    assert "### retention by category and tag" in text


#: hand-made records of one model and task: at keep 0.5, c and b tie on retention (c has fewer FLOPs), a is last
HAND = [dict(record("m", "t", BASELINE, None, 0.84, {"colour": 0.75}, {"small": 0.5}), retention={
             "score": 1.0, "per_category": {"colour": 1.0}, "per_tag": {"small": 1.0}}),
         dict(record("m", "t", "a", 0.5, 0.42, {"colour": 0.5}, {"small": 0.25}), retention={
             "score": 0.5, "per_category": {"colour": 2 / 3}, "per_tag": {"small": 0.5}}),
         dict(record("m", "t", "b", 0.5, 0.6, {"colour": 0.5}, {"small": 0.25}), retention={
             "score": 5 / 7, "per_category": {"colour": 2 / 3}, "per_tag": {"small": 0.5}}),
         record("m", "t", "c", 0.5, 0.6, {"colour": 0.75}, {"small": 0.25}),
         record("m", "t", "a", 0.25, 0.21)]
HAND[3]["retention"] = {"score": 5 / 7, "per_category": {"colour": 1.0}, "per_tag": {"small": 0.5}}
HAND[3]["flops"] = dict(HAND[3]["flops"], fastv=4e8, fastv_ratio=0.4)


@pytest.fixture
def hand_board(tmp_path):
    """``vtprune leaderboard`` on the HAND records."""
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HAND))
    assert main(["leaderboard", str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "board")]) == 0
    return tmp_path / "board"


def test_csv_holds_exactly_the_stored_numbers(hand_board):
    with open(hand_board / "leaderboard.csv") as f:
        header, *rows = list(csv.reader(f))
    assert header == [
        "model", "task", "metric", "method", "label", "pruner", "keep", "site", "layer", "positions", "options", "seed",
        "seeds", "n", "score", "score_std", "retention", "retention_std", "visual_before", "visual_after",
        "kept_ratio", "fastv_flops", "prefill_flops", "fastv_ratio", "prefill_ratio", "overhead_flops", "prefill_ms",
        "prefill_speedup", "e2e_ms", "e2e_speedup", "overhead_ms", "overhead_share", "batch_size", "peak_bytes",
        "cell", "score[category:colour]", "retention[category:colour]", "score[tag:small]", "retention[tag:small]"]
    assert rows[0] == [
        "m", "t", "accuracy", "unpruned", "unpruned", "", "", "vision", "", "", "{}", "", "", "8", "0.84", "", "1.0",
        "", "64", "64.0", "1.0", "1000000000.0", "2000000000.0", "1.0", "1.0", "0.0", "10.0", "1.0", "20.0", "1.0",
        "0.0", "0.0", "4", "", "m-t-unpruned-None", "0.75", "1.0", "0.5", "1.0"]
    assert rows[2] == [  # full precision: 5/7 is not rounded
        "m", "t", "accuracy", "b", "b", "b", "0.5", "vision", "", "", "{}", "", "", "8", "0.6", "",
        "0.7142857142857143", "", "64", "32.0", "0.5", "500000000.0", "1000000000.0", "0.5", "0.5", "0.0", "10.0",
        "1.0", "20.0", "1.0", "0.0", "0.0", "4", "", "m-t-b-0.5", "0.5", "0.6666666666666666", "0.25", "0.5"]
    assert [(row[3], row[6], row[14]) for row in rows] == [
        ("unpruned", "", "0.84"), ("a", "0.5", "0.42"), ("b", "0.5", "0.6"), ("c", "0.5", "0.6"),
        ("a", "0.25", "0.21")]  # one row per record, in the order stored
    assert [row[-2] for row in rows] == ["0.5", "0.25", "0.25", "0.25", ""]  # a at 0.25 has no tag scores


def test_markdown_ranks_by_retention_and_shows_the_stored_numbers(hand_board):
    text = (hand_board / "leaderboard.md").read_text()
    assert "| - | unpruned | 0.840 | 100.0% | 64.0 | 1G | 2G | 10.00 | 1.00x | 0.00 ms (0.0%) |" in text
    half = text.split("### keep 0.5 of the visual tokens")[1].split("###")[0]
    assert [line for line in half.splitlines() if line.startswith("| ") and "rank" not in line] == [
        "| 1 | c | 0.600 | 71.4% | 32.0 | 400M | 1G | 10.00 | 1.00x | 0.00 ms (0.0%) |",  # tie: fewer FLOPs first
        "| 2 | b | 0.600 | 71.4% | 32.0 | 500M | 1G | 10.00 | 1.00x | 0.00 ms (0.0%) |",
        "| 3 | a | 0.420 | 50.0% | 32.0 | 500M | 1G | 10.00 | 1.00x | 0.00 ms (0.0%) |"]
    quarter = text.split("### keep 0.25 of the visual tokens")[1].split("###")[0]
    assert "| 1 | a | 0.210 | 21.0% | 16.0 | 250M | 500M | 10.00 | 1.00x | 0.00 ms (0.0%) |" in quarter
    assert text.index("### keep 0.5 of") < text.index("### keep 0.25 of")
    retention = text.split("### retention by category and tag")[1]
    assert "| a | 0.5 | 66.7% | 50.0% |" in retention and "| c | 0.5 | 100.0% | 50.0% |" in retention


def test_plots_are_written_as_png(results):
    for name in ("accuracy_vs_flops.png", "accuracy_vs_prefill_latency.png", "retention_by_category.png"):
        data = (results / "leaderboard" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name


def test_leaderboard_command_reads_a_file_or_a_folder(results, tmp_path, capsys):
    assert main(["leaderboard", str(results / "results.jsonl"), "--out", str(tmp_path / "a"), "--flops",
                 "prefill"]) == 0
    assert main(["leaderboard", str(results), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "leaderboard.md").read_text() != ""
    assert (tmp_path / "a" / "leaderboard.csv").read_text() == (tmp_path / "b" / "leaderboard.csv").read_text()
    assert "wrote" in capsys.readouterr().out


def test_plot_legend_fits_inside_the_figure():
    """Long method labels wrap into fewer legend columns instead of running off the figure's edges."""
    from vtprune.harness import plots as P

    fig = P.plt.figure(figsize=(12, 4), layout="constrained")
    fig.subplots(1, 2)
    used = {BASELINE} | {f"[ref] informed: question targets {i}" for i in range(20)}
    P._legend(fig, P._styles([{"label": m} for m in used]), used, panel_cols=2)
    fig.canvas.draw()
    box = fig.legends[0].get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1
    P.plt.close(fig)
