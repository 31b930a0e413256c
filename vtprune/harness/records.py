"""What a results record holds, built the same way by both backends, and its per-category / per-tag numbers as the
leaderboard and the plots read them (field reference: ``docs/harness.md``)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..measure import _cpu_name
from .cells import Cell

SCHEMA = "vtprune-result-1"
PACKAGES = ("vtprune", "torch", "transformers", "accelerate", "tokenizers", "pillow", "lmms_eval")


@functools.cache
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def _git() -> dict[str, Any]:
    """Commit of the vtprune checkout (``None`` outside a git work tree) and whether it had local changes."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(processes: int) -> dict[str, Any]:
    """Package versions, git commit, hardware and parallelism of this run."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"versions": _versions(), "git": _git(), "hardware": {
        "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "gpus": gpus,
        "torch_threads": torch.get_num_threads(), "processes": processes}, "argv": sys.argv}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def retention(metrics: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """Score ÷ baseline score, overall, per category and per tag (``None`` where the baseline scored 0)."""
    if base is None:
        return {"score": None, "per_category": {}, "per_tag": {}}
    out: dict[str, Any] = {"score": _ratio(metrics["score"], base["score"])}
    for group in ("per_category", "per_tag"):
        out[group] = {k: _ratio(v["score"], base[group].get(k, {}).get("score"))
                      for k, v in metrics[group].items()}
    return out


def _head(cell: Cell, context: dict[str, Any], status: str, started: float) -> dict[str, Any]:
    s = cell.setting
    return {
        "schema": SCHEMA, "cell": cell.hash, "status": status, **context,
        "model": cell.model.name, "task": cell.task.name, "method": s.method, "pruner": s.pruner, "keep": s.keep,
        "site": s.site, "layer": s.layer, "positions": s.positions, "options": dict(s.options),
        "config": cell.identity, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
    }


def ok_record(cell: Cell, context: dict[str, Any], started: float, metrics: dict[str, Any],
              summary: dict[str, Any], memory: dict[str, Any], baseline: dict[str, Any] | None,
              baseline_cell: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A successful cell. ``summary`` is :func:`.probe.summarize`'s output; ``baseline`` is the record of the
    same model and task unpruned (ignored for the baseline cell itself); without it, ratios are ``None``."""
    flops = {"fastv": summary["fastv_flops"], "prefill": summary["prefill_flops"],
             "overhead": summary["overhead_flops"]}
    latency = {k: summary[k] for k in ("prefill_ms", "e2e_ms", "overhead_ms", "overhead_share", "batches")}
    latency["batch_size"] = cell.model.batch_size
    if cell.setting.is_baseline:
        baseline = {"metrics": metrics, "flops": flops, "latency": latency}
    base_flops = (baseline or {}).get("flops", {})
    base_lat = (baseline or {}).get("latency", {})
    flops["fastv_ratio"] = _ratio(flops["fastv"], base_flops.get("fastv"))
    flops["prefill_ratio"] = _ratio(flops["prefill"], base_flops.get("prefill"))
    latency["prefill_speedup"] = _ratio(base_lat.get("prefill_ms"), latency["prefill_ms"])
    latency["e2e_speedup"] = _ratio(base_lat.get("e2e_ms"), latency["e2e_ms"])
    return {
        **_head(cell, context, "ok", started), "baseline_cell": baseline_cell,
        "metrics": metrics, "retention": retention(metrics, baseline and baseline["metrics"]),
        "visual_tokens": {k: summary[k] for k in ("visual_before", "visual_after", "kept_ratio")},
        "flops": flops, "latency": latency, "memory": memory, **(extra or {}),
    }


def error_record(cell: Cell, context: dict[str, Any], started: float, error: str, traceback: str = ""
                 ) -> dict[str, Any]:
    """A failed cell: the error and the tail of its traceback; a rerun tries the cell again."""
    return {**_head(cell, context, "error", started), "error": error, "traceback": traceback}


def group_columns(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every (group kind, name) with a score in some record: ``("category", "colour")``, ``("tag", "small")``."""
    seen: dict[tuple[str, str], None] = {}
    for r in records:
        for kind in ("category", "tag"):
            for name in r["metrics"][f"per_{kind}"]:
                seen[(kind, name)] = None
    return sorted(seen)


def group_value(record: dict[str, Any], kind: str, name: str, what: str) -> float | None:
    """Score (``what="score"``) or retention of one category/tag of a record (``None`` if absent)."""
    if what == "score":
        return record["metrics"][f"per_{kind}"].get(name, {}).get("score")
    return record["retention"][f"per_{kind}"].get(name)
