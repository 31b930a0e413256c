"""The lmms-eval backend end to end: a sweep whose cells are real lmms-eval CLI runs (one subprocess, offline) of the
``vtprune_llava_hf`` entry point on an exported local task with a tiny saved model; asserts on lmms-eval's own
results files and on the records read back from them."""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval")

from lmms_sweep import lmms_sweep  # noqa: E402

from vtprune.lmms_plugin import MODELS, manifests  # noqa: E402


def test_the_entry_point_registers_the_pruned_wrappers():
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="lmms_eval.models")] == ["vtprune.lmms_plugin:manifests"]
    assert {m.model_id for m in manifests()} == set(MODELS)


def test_a_sweep_on_the_lmms_eval_backend(tmp_path):
    cells = lmms_sweep(tmp_path, "llava", keep=4, size=4)
    (base, _), (pruned, pruned_results) = cells
    out = tmp_path / "out"
    assert (base["method"], pruned["method"]) == ("unpruned", "uniform")
    for (record, results), visual_after in zip(cells, (16, 4)):
        assert record["status"] == "ok"
        lmms = record["lmms_eval"]
        task = next(iter(results["results"]))
        assert task == "vtp_shapes_4" and results["n-samples"][task]["effective"] == 4
        assert results["results"][task]["score,none"] == record["metrics"]["score"]
        throughput = results["throughput"]
        assert throughput["avg_vtprune_visual_after"] == visual_after == record["visual_tokens"]["visual_after"]
        assert throughput["avg_vtprune_visual_before"] == 16
        assert throughput["avg_vtprune_prefill_ms"] == record["latency"]["prefill_ms"] > 0
        assert throughput["avg_vtprune_fastv_flops"] == record["flops"]["fastv"] > 0
        assert results["config"]["model"] == "vtprune_llava_hf"
        samples = (out / lmms["samples_file"]).read_text().splitlines()
        assert len(samples) == 4 and len((out / record["predictions"]).read_text().splitlines()) == 4
    assert "pruner=uniform,keep=4,site=pre_llm" in pruned_results["config"]["model_args"]
    assert pruned["lmms_eval"]["command"].startswith("lmms-eval --model vtprune_llava_hf --model_args pretrained=")
    assert pruned["flops"]["fastv_ratio"] < 1 and pruned["baseline_cell"] == base["cell"]
