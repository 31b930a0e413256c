"""A sweep on the lmms_eval backend run through the stock CLI (``vtprune sweep`` -> ``lmms-eval``, one offline
subprocess) on a tiny saved model, for the tests of each family's lmms-eval wrapper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from vtprune.harness.store import ResultsStore

REPO = Path(__file__).resolve().parent.parent


def lmms_sweep(tmp_path: Path, family: str, keep: int, size: int = 2) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The unpruned and ``uniform`` (``keep`` tokens per image) cells of a sweep of the tiny ``family`` on ``size``
    synthetic shapes questions: (record, lmms-eval's results JSON) per cell."""
    config = {"name": family, "backend": "lmms_eval", "models": [{"tiny": family}],
              "pruners": [{"name": "uniform", "keep": keep}], "tasks": [{"synthetic": "shapes", "size": size}],
              "generation": {"max_new_tokens": 2}}
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "vtprune.cli", "sweep", str(path), "--out", str(out), "--no-progress",
                           "--no-leaderboard"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = ResultsStore(out / "results.jsonl").records()
    return [(r, json.loads((out / r["lmms_eval"]["results_file"]).read_text())) for r in records]


def check_cells(cells: list[tuple[dict[str, Any], dict[str, Any]]], model_id: str, before: int, after: int) -> None:
    """The two cells of :func:`lmms_sweep` ran ``model_id`` through lmms-eval: both ok, ``before`` visual tokens per
    question, all of them kept unpruned and ``after`` with the pruner, and the pruned cell's equivalent command."""
    for (record, results), kept in zip(cells, (before, after)):
        assert record["status"] == "ok", record.get("error")
        assert results["config"]["model"] == model_id
        throughput = results["throughput"]
        assert throughput["avg_vtprune_visual_before"] == before and throughput["avg_vtprune_visual_after"] == kept
    assert cells[1][0]["lmms_eval"]["command"].startswith(f"lmms-eval --model {model_id} --model_args pretrained=")
