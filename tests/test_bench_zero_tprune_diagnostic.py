"""bench/zero_tprune_diagnostic.py on a handful of testbed questions: the plumbing runs, the recomputed I-stage is
vtprune's own, the default selection is the one the pruner made, and the report has every section. No numbers
are asserted beyond what holds by construction."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from vtprune.methods.zero_tprune import WPROptions, wpr_node_scores
from vtprune.ops import reading_graphs

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "zero_tprune_diagnostic.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The bench script imported from its file (``bench/`` is not a package), registered while the tests run."""
    spec = importlib.util.spec_from_file_location("zero_tprune_diagnostic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_auc_and_kept_metrics(bench):
    pos = torch.tensor([True, False, True, False])
    assert bench.auc(torch.tensor([3.0, 1.0, 2.0, 0.0]), pos) == 1.0
    assert bench.auc(torch.tensor([0.0, 1.0, 0.0, 2.0]), pos) == 0.0
    assert bench.auc(torch.ones(4), pos) == 0.5
    assert math.isnan(bench.auc(torch.ones(4), torch.zeros(4, dtype=torch.bool)))
    m = bench.kept_metrics(torch.tensor([0, 1]), torch.tensor([2, 1, 0, 1]))
    assert m == pytest.approx({"mean_priority": 1.5, "object_recall": 2 / 3, "target_recall": 1.0})


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_views_are_the_pruners_and_the_i_stage_is_vtprunes(bench, family):
    model, processor = bench.load_checkpoint(bench.CHECKPOINTS / family)
    items = bench.held_out(family, 3, seed=1)
    captured = bench.capture_views(model, processor, family, items)
    assert len(captured) == 3
    for view, kept in captured:
        graphs = reading_graphs(view)
        assert graphs[0].has_cls == (family == "llava")
        for g in graphs:  # the diagnostic's I-stage with the method's options is wpr_node_scores itself
            torch.testing.assert_close(bench.i_stage(g, 1, 0.0, True, True), wpr_node_scores(g, WPROptions()))
        k = bench.budget(bench.KEEPS[0], view.num_tokens)
        assert torch.equal(bench.zero_tprune(graphs, view.num_tokens, k, WPROptions(), 0.5).indices, kept)


def test_report_has_every_section(bench, tmp_path):
    out = tmp_path / "diag"
    report = bench.main(["--n", "2", "--seed", "3", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert set(saved["families"]) == {"llava", "qwen2_vl"}
    for family, r in saved["families"].items():
        assert r["n"] == 2 and r["selections_equal_to_the_pruner"].startswith("2/2")
        assert set(r["concentration"]) == set(r["heads"]) == {str(layer) for layer in r["encoder_layers"]}
        methods = r["methods"]
        assert "zero_tprune (I'->S->I, default)" in methods and "random" in methods
        assert methods["[ref] informed: question targets"]["auc_objects"] == 1.0
        assert ("wpr 1 it, filter, [CLS] init" in methods) == (family == "llava")
        for keep in bench.KEEPS:
            assert f"s_share_of_lost_objects@{keep}" in r["similarity"]
    text = out.with_suffix(".md").read_text()
    for section in ("(a) concentration", "(b) scores", "(c) head filter", "(d) similarity stage"):
        assert text.count(section) == 2
    assert report["families"]["llava"]["has_cls"] and not report["families"]["qwen2_vl"]["has_cls"]
