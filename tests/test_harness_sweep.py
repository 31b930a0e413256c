"""Running sweeps with the local backend: what a record holds, failing cells, resume after a kill, the store's
atomic appends, and data parallelism with ``accelerate launch`` (2 CPU processes) giving the results of one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vtprune.cli import main
from vtprune.errors import VTPruneError
from vtprune.harness.runner import run_sweep
from vtprune.harness.schema import load_config
from vtprune.harness.store import ResultsStore

REPO = Path(__file__).resolve().parent.parent
CONFIG = {
    "name": "t", "seed": 0,
    "models": [{"tiny": "llava", "batch_size": 3}],
    "pruners": [{"name": "uniform", "keep": [0.5, 4]},
                {"name": "random", "keep": 2, "site": "layer", "layer": [2, 9]}],  # K=9 > 4 layers: fails
    "tasks": [{"synthetic": "shapes", "size": 8}],
    "generation": {"max_new_tokens": 2},
}


def write_config(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One finished sweep (exit status 1: one cell fails); returns (config path, output folder, records)."""
    folder = tmp_path_factory.mktemp("sweep")
    path = write_config(folder, CONFIG)
    status = main(["sweep", str(path), "--out", str(folder / "out"), "--no-progress", "--no-leaderboard"])
    torch.set_num_threads(1)
    assert status == 1
    return path, folder / "out", ResultsStore(folder / "out" / "results.jsonl").records()


def by_method(records: list[dict]) -> dict[tuple, dict]:
    return {(r["method"], r["keep"]): r for r in records}


def test_each_cell_appends_one_complete_record(sweep):
    _, out, records = sweep
    assert [(r["method"], r["keep"], r["status"]) for r in records] == [
        ("unpruned", None, "ok"), ("uniform", 0.5, "ok"), ("uniform", 4, "ok"), ("random K=2", 2, "ok"),
        ("random K=9", 2, "error")]
    ok = [r for r in records if r["status"] == "ok"]
    base = ok[0]
    for r in ok:
        assert r["schema"] == "vtprune-result-1" and r["sweep"] == "t" and r["seed"] == 0
        assert r["config"]["model"]["tiny"] == "llava" and r["config"]["task"]["n"] == 8
        assert set(r["env"]["versions"]) >= {"python", "vtprune", "torch", "transformers"}
        assert r["env"]["git"]["commit"] and r["env"]["hardware"]["processes"] == 1
        assert r["env"]["hardware"]["torch_threads"] == 1
        assert r["metrics"]["metric"] == "exact_match" and r["metrics"]["n"] == 8
        assert set(r["metrics"]["per_category"]) <= {"colour", "shape", "count", "exist"}
        assert r["baseline_cell"] == base["cell"]
        assert r["flops"]["fastv"] > 0 and r["flops"]["prefill"] > r["flops"]["fastv"]
        assert r["latency"]["prefill_ms"] > 0 and r["latency"]["e2e_ms"] >= r["latency"]["prefill_ms"]
        assert r["latency"]["batches"] == 3 and r["latency"]["batch_size"] == 3
        assert r["memory"]["kv_bytes"] > 0
        speedup = base["latency"]["prefill_ms"] / r["latency"]["prefill_ms"]
        assert r["latency"]["prefill_speedup"] == pytest.approx(speedup)
        rows = [json.loads(line) for line in (out / r["predictions"]).read_text().splitlines()]
        assert len(rows) == 8 and all("targets" in row for row in rows)
        assert sum(row["score"] for row in rows) / 8 == pytest.approx(r["metrics"]["score"])
        if base["metrics"]["score"] == 0:
            assert r["retention"]["score"] is None
        else:
            assert r["retention"]["score"] == pytest.approx(r["metrics"]["score"] / base["metrics"]["score"])
    cells = by_method(ok)
    assert cells[("unpruned", None)]["visual_tokens"] == {"visual_before": 16.0, "visual_after": 16.0,
                                                          "kept_ratio": 1.0}
    assert cells[("uniform", 0.5)]["visual_tokens"]["visual_after"] == 8.0
    assert cells[("uniform", 4)]["visual_tokens"]["visual_after"] == 4.0
    assert cells[("random K=2", 2)]["visual_tokens"]["visual_after"] == 2.0
    assert cells[("uniform", 4)]["flops"]["fastv_ratio"] < cells[("uniform", 0.5)]["flops"]["fastv_ratio"] < 1
    assert cells[("uniform", 4)]["latency"]["overhead_ms"] > 0 and base["latency"]["overhead_ms"] == 0


def test_a_failing_cell_is_recorded_and_retried_on_the_next_run(sweep, capsys):
    path, out, records = sweep
    failed = records[-1]
    assert failed["status"] == "error" and failed["layer"] == 9
    assert "layer=9 is out of range" in failed["error"] and "Traceback" in failed["traceback"]
    assert main(["sweep", str(path), "--out", str(out), "--no-progress", "--no-leaderboard"]) == 1
    torch.set_num_threads(1)
    assert "5 cells (4 finished earlier, 1 to run)" in capsys.readouterr().err
    again = ResultsStore(out / "results.jsonl").records()
    assert again[:5] == records and len(again) == 6 and again[5]["status"] == "error"


def test_random_weight_models_from_a_config_or_a_saved_folder(sweep, tmp_path):
    saved = sweep[1] / "models" / "tiny-llava-seed-0"
    data = {**CONFIG, "pruners": [], "tasks": [{"synthetic": "shapes", "size": 3}],
            "models": [{"name": "from-config", "config": str(saved / "config.json"), "random_weights": True,
                        "processor": str(saved)},
                       {"name": "from-folder", "path": str(saved), "random_weights": True, "seed": 1}]}
    path = write_config(tmp_path, data)
    with pytest.raises(VTPruneError, match=r"models\[1\]\.seed: unknown key"):
        load_config(path)
    del data["models"][1]["seed"]
    run = run_sweep(load_config(write_config(tmp_path, data), output=tmp_path / "out"), progress=False)
    torch.set_num_threads(1)
    records = ResultsStore(tmp_path / "out" / "results.jsonl").records()
    assert run.counts == {"ok": 2, "error": 0} and [r["model"] for r in records] == ["from-config", "from-folder"]
    assert all(r["visual_tokens"]["visual_before"] == 16 for r in records)


def test_a_killed_sweep_resumes_without_losing_or_repeating_cells(tmp_path):
    data = {**CONFIG, "pruners": [{"name": "uniform", "keep": [0.75, 0.5, 0.25, 4, 2]},
                                  {"name": "random", "keep": [0.5, 0.25, 2]}],
            "tasks": [{"synthetic": "shapes", "size": 12}]}
    path = write_config(tmp_path, data)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "vtprune.cli", "sweep", str(path), "--out", str(out),
                             "--no-progress", "--no-leaderboard"], env=env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if results.is_file() and len(results.read_bytes().splitlines()) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    before = results.read_text()
    finished = [json.loads(line) for line in before.splitlines()]
    assert 2 <= len(finished) < 9 and all(r["status"] == "ok" for r in finished)

    run = run_sweep(load_config(path, output=out), progress=False)
    torch.set_num_threads(1)
    after = results.read_text()
    assert after.startswith(before)  # nothing lost or rewritten
    records = [json.loads(line) for line in after.splitlines()]
    assert run.counts == {"ok": 9 - len(finished), "error": 0}
    assert len(records) == 9 and len({r["cell"] for r in records}) == 9  # every cell exactly once
    assert records[0]["method"] == "unpruned"


def test_store_appends_whole_lines_and_skips_a_damaged_one(tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl")
    store.append({"cell": "a", "status": "ok", "x": float("nan")})
    with open(store.path, "ab") as f:
        f.write(b'{"cell": "b", "status": "o')  # a line cut short, e.g. by a full disk
    store.append({"cell": "c", "status": "error"})
    store.append({"cell": "c", "status": "ok"})
    assert [r["cell"] for r in store.records()] == ["a", "c", "c"] and store.damaged == [2]
    assert store.records()[0]["x"] is None
    assert set(store.finished()) == {"a", "c"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_accelerate_launch_give_the_results_of_one(sweep, tmp_path):
    path, single, _ = sweep
    out = tmp_path / "dp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "vtprune.cli", "sweep", str(path), "--out", str(out),
           "--no-progress", "--no-leaderboard"]
    done = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 1, done.stderr[-3000:]  # the K=9 cell fails in both runs
    one = ResultsStore(single / "results.jsonl").finished()
    two = ResultsStore(out / "results.jsonl").records()
    assert len(two) == 5 and all(r["env"]["hardware"]["processes"] == 2 for r in two)
    two_ok = {r["cell"]: r for r in two if r["status"] == "ok"}
    assert set(two_ok) == set(one)
    for cell, r in two_ok.items():
        for key in ("metrics", "retention", "visual_tokens"):
            assert r[key] == one[cell][key], key
        assert r["flops"] == pytest.approx(one[cell]["flops"])
        assert r["latency"]["batches"] == 3
        assert (out / r["predictions"]).read_text() == (single / one[cell]["predictions"]).read_text()


def test_the_evaluator_encodes_each_batch_of_a_task_once_and_predicts_the_same(tmp_path, monkeypatch):
    from vtprune.harness import models
    from vtprune.harness.local import LocalEvaluator, batches
    from vtprune.harness.schema import GenerationSpec, MeasureSpec, ModelSpec, TaskSpec
    from vtprune.harness.synthetic import write_shapes_task
    from vtprune.harness.tasks import load_task
    from vtprune.registry import make_config

    spec = ModelSpec(name="m", tiny="llava", batch_size=3)
    model, processor = models.load(spec, tmp_path, "cpu", 0)
    tasks = [load_task(TaskSpec(path=str(write_shapes_task(tmp_path / f"t{n}", n))), tmp_path / f"t{n}")
             for n in (6, 5)]
    cached = LocalEvaluator(model, processor, spec, GenerationSpec(max_new_tokens=2))
    calls = []
    encode = cached.encode
    monkeypatch.setattr(cached, "encode", lambda items, task: calls.append(task.name) or encode(items, task))
    config, measure = make_config("uniform", keep=0.5), MeasureSpec()
    first = cached.run(tasks[0], batches(6, 3), config, measure)
    again = cached.run(tasks[0], batches(6, 3), None, measure)
    assert calls == [tasks[0].name] * 2  # two batches, encoded by the first cell only
    cached.run(tasks[1], batches(5, 3), None, measure)
    cached.run(tasks[0], batches(6, 3), None, measure)
    assert calls == [tasks[0].name] * 2 + [tasks[1].name] * 2 + [tasks[0].name] * 2  # one task held at a time
    fresh = LocalEvaluator(model, processor, spec, GenerationSpec(max_new_tokens=2))
    assert fresh.run(tasks[0], batches(6, 3), config, measure).predictions == first.predictions
    assert fresh.run(tasks[0], batches(6, 3), None, measure).predictions == again.predictions
    for batch in batches(6, 3):
        inputs, direct = cached.batch_inputs(tasks[0], batch), encode([tasks[0].items[i] for i in batch], tasks[0])
        assert inputs.keys() == direct.keys() and all(torch.equal(inputs[k], direct[k]) for k in direct)
