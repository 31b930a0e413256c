"""``vtprune leaderboard``: every number in leaderboard.csv / leaderboard.md is the stored record's, methods are ranked
by retention within each budget, and the three plots are written."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml

from vtprune.cli import main
from vtprune.harness import leaderboard as L
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


def test_csv_holds_exactly_the_stored_numbers(results):
    records = L.latest_ok(ResultsStore(results / "results.jsonl").records())
    assert len(records) == 5 and records[0]["metrics"]["score"] == 0.5  # the baseline matches its own answers
    with open(results / "leaderboard" / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    groups = L.group_columns(records)
    assert ("category", "colour") in groups
    for record, row in zip(records, rows):
        expected = {name: get(record) for name, get in L.COLUMNS.items()}
        expected.update({f"{what}[{kind}:{name}]": L.group_value(record, kind, name, what)
                         for kind, name in groups for what in ("score", "retention")})
        for column, value in expected.items():
            cell = row[column]
            if value is None:
                assert cell == "", column
            elif isinstance(value, float):
                assert float(cell) == value, column  # full precision, no rounding
            else:
                assert cell == str(value), column


def test_markdown_ranks_by_retention_and_shows_the_stored_numbers(results):
    text = (results / "leaderboard" / "leaderboard.md").read_text()
    records = L.latest_ok(ResultsStore(results / "results.jsonl").records())
    base = records[0]
    assert "| " + " | ".join(L.method_row("-", base)) + " |" in text
    for keep in (0.5, 0.25):
        section = text.split(f"### keep {L.fmt_keep(keep)}")[1].split("###")[0]
        ranked = L.ranked([r for r in records if r["keep"] == keep])
        rets = [r["retention"]["score"] for r in ranked]
        assert rets == sorted(rets, reverse=True)
        for rank, r in enumerate(ranked, 1):
            row = "| " + " | ".join(L.method_row(rank, r)) + " |"
            assert row in section
            assert L.fmt_pct(r["retention"]["score"]) == f"{100 * r['metrics']['score'] / 0.5:.1f}%"
    assert "## Failed cells" in text and "pool K=9 keep=0.5" in text and "out of range" in text
    assert "### retention by category and tag" in text


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
    used = {L.BASELINE} | {f"[ref] informed: question targets {i}" for i in range(20)}
    P._legend(fig, P._styles([{"label": m} for m in used]), used, panel_cols=2)
    fig.canvas.draw()
    box = fig.legends[0].get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1
    P.plt.close(fig)
