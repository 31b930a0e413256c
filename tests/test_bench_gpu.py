"""bench/gpu_report.py's dry run (tiny models, CPU): the same code path as the GPU run writes the same report, with
every exactness field computed. Only the plumbing: timings are never asserted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from bench_scripts import bench_script

MODELS = "llava-next-7b,qwen2.5-vl-7b"
METHODS = "random,dart"  # one pre-LLM and one in-LLM method keep the test cheap; the GPU run takes all five


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The script, imported from its file."""
    with bench_script("gpu_report") as module:
        yield module


@pytest.fixture(scope="module")
def dry(bench, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gpu-dry")
    bench.main(["--dry-run", "--models", MODELS, "--methods", METHODS, "--repeats", "1", "--budget-s", "1e5",
                "--out", str(out)])  # no budget cut on a loaded machine: this test checks the structure
    return json.loads((out / "report.json").read_text()), out


def test_dry_run_reports_every_model_kernel_and_setting(dry):
    report, out = dry
    meta = report["meta"]
    assert meta["dry_run"] and meta["complete"] and meta["kernels"] == ["sdpa", "eager"]
    assert report["env"]["torch_threads"] >= 1 and report["env"]["dtype"] == "bfloat16"
    assert [m["name"] for m in report["models"]] == MODELS.split(",")
    for m in report["models"]:
        assert m["status"] == "ok" and 0 < min(m["keeps"]) and max(m["keeps"]) < m["visual_tokens"]
        assert [k["attn"] for k in m["kernels"]] == ["sdpa", "eager"]
        for k in m["kernels"]:
            assert k["status"] == "ok", k["status"]
            assert k["kernel_env"]["attn_implementation"] == k["attn"]
            labels = [r["label"] for r in k["settings"]]
            assert labels[0] == "unpruned" and len(labels) == 1 + 2 * len(m["keeps"])
            for r in k["settings"]:
                assert r["prefill_ms"] > 0 and r["speedup"] > 0 and r["ttft_ms"] > 0 and r["kv_bytes"] > 0
                assert r["decode_tokens_per_s"] > 0 and "peak_bytes" in r
            assert k["settings"][0]["speedup"] == 1.0
        greedy = m["greedy"]  # the greedy kernel check: the torch loop on CPU, the kernel named as not used
        assert greedy["rows"] and all(r["equal"] for r in greedy["rows"]) and greedy["why_not"]
    md = (out / "report.md").read_text()
    assert "DRY RUN" in md and md.count("### ") == 4 and "DART reports 2.99×" in md
    assert md.count("**Greedy selection: one Triton launch vs the torch loop**") == 2
    assert report["greedy_kernel"]["launches"] == 0 and report["greedy_kernel"]["failure"] is None
    attention = report["received_attention"]  # both block shapes ran and agree
    assert [r["patches"] for r in attention["rows"]] == [64, 256]
    assert all(r["default_ms"] > 0 and r["per_head_ms"] > 0 and r["max_rel_diff"] < 1e-5 for r in attention["rows"])
    assert "**Received attention, one call**" in md


def test_dry_run_computes_exactness_and_the_oracle_ratio(dry):
    report, _ = dry
    for m in report["models"]:
        for k in m["kernels"]:
            keep_all = k["keep_all"]
            assert [(r["method"], r["keep"]) for r in keep_all][-1] == ("random", 1.0)
            for r in keep_all:  # keep-all is bit-identical to the unhooked model on the CPU kernels
                assert "error" not in r, r
                assert r["max_abs_diff"] == 0.0 and r["bit_identical"] is True
            assert len(k["oracle"]) == 2 * len(m["keeps"])
            for r in k["oracle"]:  # pruned == the hand-shortened input, and its timing against it
                assert "error" not in r and "oracle_error" not in r, r
                assert r["max_abs_diff"] == 0.0 and r["bit_identical"] is True and r["max_abs_logit"] > 0
                assert r["kept"] == r["tokens"] - r["visual_before"] + r["visual_after"]
                assert r["ratio"] > 0 and r["oracle_passes"] >= 1


def test_no_time_left_skips_with_a_note_and_still_writes_the_report(bench, tmp_path):
    report = bench.main(["--dry-run", "--models", "llava-1.5-7b", "--budget-s", "0", "--out", str(tmp_path)])
    assert report["models"][0]["status"].startswith("skipped: time budget")
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["complete"]
    assert "skipped: time budget" in (tmp_path / "report.md").read_text()


def test_a_model_whose_family_is_not_registered_is_named_not_run(bench, monkeypatch, tmp_path):
    spec = bench.ModelSpec("future-vl", "no_such_family", None, (64,), 576)
    monkeypatch.setattr(bench, "MODELS", (spec,))
    report = bench.main(["--dry-run", "--out", str(tmp_path)])
    assert report["models"] == [] and "future-vl: not run, family 'no_such_family'" in report["notes"][0]
