"""The lmms-eval backend end to end: a sweep whose cells are real lmms-eval CLI runs (one subprocess, offline) of the
``vtprune_llava_hf`` entry point on an exported local task with a tiny saved model; asserts on lmms-eval's own
results files and on the records read back from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lmms_eval")

from vtprune.harness.store import ResultsStore  # noqa: E402
from vtprune.lmms_plugin import MODELS, manifests  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_the_entry_point_registers_the_pruned_wrappers():
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="lmms_eval.models")] == ["vtprune.lmms_plugin:manifests"]
    assert {m.model_id for m in manifests()} == set(MODELS)


def test_a_sweep_on_the_lmms_eval_backend(tmp_path):
    config = {"name": "lm", "backend": "lmms_eval", "models": [{"tiny": "llava"}],
              "pruners": [{"name": "uniform", "keep": 4}], "tasks": [{"synthetic": "shapes", "size": 4}],
              "generation": {"max_new_tokens": 2}}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "vtprune.cli", "sweep", str(path), "--out", str(out), "--no-progress",
                           "--no-leaderboard"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    base, pruned = ResultsStore(out / "results.jsonl").records()
    assert (base["method"], pruned["method"]) == ("unpruned", "uniform")
    for record, visual_after in ((base, 16), (pruned, 4)):
        assert record["status"] == "ok"
        lmms = record["lmms_eval"]
        results = json.loads((out / lmms["results_file"]).read_text())
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
    assert "pruner=uniform,keep=4,site=pre_llm" in json.loads(
        (out / pruned["lmms_eval"]["results_file"]).read_text())["config"]["model_args"]
    assert pruned["lmms_eval"]["command"].startswith("lmms-eval --model vtprune_llava_hf --model_args pretrained=")
    assert pruned["flops"]["fastv_ratio"] < 1 and pruned["baseline_cell"] == base["cell"]
