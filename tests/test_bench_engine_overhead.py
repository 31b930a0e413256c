"""bench/engine_overhead.py on tiny models: the oracle check runs, can fail, and the report has a row for every
family × site × keep, prefill and decode. Only the plumbing: timings are never asserted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from bench_scripts import bench_script

from vtprune.testing import FAMILIES


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The script, imported from its file."""
    with bench_script("engine_overhead") as module:
        yield module


def test_tiny_run_checks_and_reports_every_cell(bench, tmp_path, capsys):
    out = tmp_path / "engine_overhead.json"
    bench.main(["--tiny", "--repeats", "2", "--warmup", "0", "--hooks", "1", "--decode", "2", "--out", str(out),
                "--markdown"])
    rows = json.loads(out.read_text())["results"]
    cells = [(f, s, k) for f in FAMILIES for s in bench.SITES for k in bench.KEEPS]
    assert [(r["family"], r["site"], r["keep"]) for r in rows] == cells
    for r in rows:
        assert r["max_abs_diff"] <= bench.ATOL  # the pruned logits matched the oracle's before any timing
        assert 0 < r["visual_after"] < r["visual_before"]
        assert r["kept"] == r["tokens"] - r["visual_before"] + r["visual_after"]
        assert len(r["pruned_ms_all"]) == len(r["oracle_ms_all"]) == 2 and r["ratio"] > 0
        assert r["layer"] == (2 if r["site"] == "layer" else None)
        assert any(name.endswith("_lm_pre") for name in r["hooks_ms"]), r["hooks_ms"]  # the engine's hooks were timed
        assert r["decode_steps"] == 2 and r["decode_max_abs_diff"] <= bench.ATOL and r["decode_ratio"] > 0
        assert r["decode_hooks_ms_per_step"] > 0  # the engine's hooks were timed on decode steps too
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 2 * (1 + len(cells))  # the prefill table, then the decode table


def test_the_check_tells_a_wrong_oracle_apart(bench, monkeypatch):
    """Negative control: an oracle that prunes one layer later than the hooks do is refused."""
    model, inputs = bench.build("llava", tiny=True)
    cell = bench.Cell("llava", "layer", 0.25, layer=2)
    right = bench.oracle
    bench.check(model, inputs, cell)

    def one_layer_late(model, inputs, keep, site, layer, last_only, stages=()):
        return right(model, inputs, keep, site, layer + 1, last_only, stages)

    monkeypatch.setattr(bench, "oracle", one_layer_late)
    with pytest.raises(bench.OracleMismatch, match="llava K=2 keep=0.25"):
        bench.check(model, inputs, cell)


def test_the_decode_check_tells_a_wrong_position_apart(bench, monkeypatch):
    """Negative control: an oracle decoding one position too early (as if the cache were renumbered) is refused."""
    model, inputs = bench.build("qwen2_vl", tiny=True)
    cell = bench.Cell("qwen2_vl", "pre_llm", 0.25, layer=2)
    right = bench.decode_steps
    bench.check_decode(model, inputs, cell, 2)

    def early(model, cache, token, steps, next_pos=None):
        return right(model, cache, token, steps, None if next_pos is None else next_pos - 1)

    monkeypatch.setattr(bench, "decode_steps", early)
    with pytest.raises(bench.OracleMismatch, match="qwen2_vl pre_llm keep=0.25: decode step 0"):
        bench.check_decode(model, inputs, cell, 2)


def test_a_decode_oracle_that_cannot_run_is_reported_not_raised(bench, monkeypatch):
    """A family whose decode the oracle cannot reproduce (Gemma 3's sliding windows over per-layer cache lengths
    at mid size) gets ``decode_error`` and an n/a row; its prefill cell and the other cells still count."""
    right = bench.decode_steps

    def failing(model, cache, token, steps, next_pos=None):
        if next_pos is not None:
            raise RuntimeError("The size of tensor a (354) must match the size of tensor b (512)")
        return right(model, cache, token, steps)

    monkeypatch.setattr(bench, "decode_steps", failing)
    cells, _ = bench.run(["llava"], ["pre_llm"], [0.25], 2, 1, 0, tiny=True, decode=2)
    (cell,) = cells
    assert cell.decode_error.startswith("RuntimeError: The size") and not cell.decode_pruned_s
    assert cell.as_dict()["decode_error"] == cell.decode_error and cell.pruned_s
    assert "| n/a | RuntimeError" in bench.markdown(cells)


def test_multi_stage_cells_check_against_a_staged_oracle(bench, tmp_path, monkeypatch):
    """``--sites schedule``: one cell per family with three cuts (the tiny LLMs have 4 layers); its prefill and
    decode match the oracle that runs each layer group on the rows its cut kept, and an oracle whose second cut
    comes one layer late is refused (negative control)."""
    out = tmp_path / "staged.json"
    bench.main(["--tiny", "--families", "llava,qwen2_vl", "--sites", "schedule", "--schedule", "1:0.5,2:0.25,3:0.11",
                "--repeats", "1", "--warmup", "0", "--decode", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["family"], r["schedule"]) for r in rows] == [(f, [[1, 0.5], [2, 0.25], [3, 0.11]])
                                                            for f in ("llava", "qwen2_vl")]
    for r in rows:
        assert r["max_abs_diff"] <= bench.ATOL and r["decode_max_abs_diff"] <= bench.ATOL
        assert r["kept"] == r["tokens"] - r["visual_before"] + r["visual_after"]
    model, inputs = bench.build("llava", tiny=True)
    cell = bench.Cell("llava", "layer", 0.11, 1, schedule=((1, 0.5), (2, 0.25), (3, 0.11)))
    bench.check(model, inputs, cell)
    right = bench._staged_oracle

    def late(model, inputs, stages, last_only):
        return right(model, inputs, [(layer + (i == 1), rows) for i, (layer, rows) in enumerate(stages)], last_only)

    monkeypatch.setattr(bench, "_staged_oracle", late)
    with pytest.raises(bench.OracleMismatch, match="llava K=1/2/3"):
        bench.check(model, inputs, cell)


@pytest.mark.parametrize("argv", [["--families", "llava,nope"], ["--sites", "middle"], ["--repeats", "0"], ["--hooks", "-1"],
                                  ["--decode", "-1"], ["--schedule", "2-0.5"]])
def test_bad_options_are_named_errors(bench, argv):
    with pytest.raises(bench.BenchSetupError):
        bench.main(["--tiny", *argv])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_video_cells_check_against_the_oracle(bench, family, monkeypatch):
    """--video-frames: a video prompt's pruned prefill and decode match the oracle at both sites; an oracle that
    keeps the video's first tokens instead of the selected ones is refused (negative control)."""
    model, inputs = bench.build(family, tiny=True, video_frames=4)
    assert "pixel_values_videos" in inputs and "pixel_values" not in inputs
    for site in ("pre_llm", "layer"):
        cell = bench.Cell(family, site, 0.25, layer=2)
        bench.check(model, inputs, cell)
        bench.check_decode(model, inputs, cell, 2)
        assert 0 < cell.visual[1] < cell.visual[0]
    wrong = bench.Cell(family, "pre_llm", 0.25, layer=2)
    bench.check(model, inputs, wrong)
    right = bench.oracle
    visual = bench._item_tokens(model, inputs["input_ids"][0])
    first = torch.cat([(~visual).nonzero().flatten(), visual.nonzero().flatten()[:wrong.visual[1]]]).sort().values

    def first_tokens(model, inputs, keep, site, layer, last_only, stages=()):
        return right(model, inputs, first, site, layer, last_only, stages)

    monkeypatch.setattr(bench, "oracle", first_tokens)
    with pytest.raises(bench.OracleMismatch):
        bench.check(model, inputs, wrong)
