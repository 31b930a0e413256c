"""Measurement utilities, synthetic benchmark inputs and the ``vtprune bench`` command, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch_inputs, model

import vtprune
from vtprune import benchmark as B
from vtprune import measure as M
from vtprune.cli import main
from vtprune.errors import VTPruneError
from vtprune.flops import LLMDims
from vtprune.testing import FAMILIES


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory):
    """The tiny LLaVA config as a JSON file, like a ``configs/models`` entry."""
    path = tmp_path_factory.mktemp("cfg") / "tiny-llava.json"
    path.write_text(json.dumps(model("llava").model.config.to_dict()))
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_inputs_run_and_have_the_right_placeholder_count(family):
    tv = model(family)
    inputs = B.synthetic_inputs(tv.model.config, image_size=(112, 56), text_tokens=20)
    n_image = int((inputs["input_ids"] == tv.model.config.image_token_id).sum())
    assert inputs["input_ids"].shape[1] == 20 + n_image + (2 if family.startswith("qwen") else 0)
    with vtprune.apply(tv.model, "uniform", keep=0.5) as handle, torch.no_grad():
        tv.model(**inputs)  # the model itself checks placeholders == image features
        assert handle.stats.visual_before == [n_image]


def test_kv_bytes_prefill_and_generate_measurements():
    tv = model("qwen2_vl")
    inputs = batch_inputs(tv, [0])
    timer = M.Timer("cpu")
    sample = M.measure_prefill(tv.model, inputs, timer, memory=True)
    dims = LLMDims.from_config(tv.model)
    n = inputs["input_ids"].shape[1]
    assert sample.kv_bytes == 2 * dims.layers * n * dims.kv_heads * dims.head_dim * 4
    assert sample.seconds > 0 and (sample.peak_bytes is None or sample.peak_bytes >= 0)
    assert M.measure_prefill(tv.model, inputs, timer).peak_bytes is None  # memory is measured only on request
    gen = M.measure_generate(tv.model, inputs, 4, timer)
    assert gen.new_tokens == 4 and 0 < gen.ttft_seconds < gen.e2e_seconds and gen.decode_tokens_per_second > 0
    with vtprune.apply(tv.model, "random", keep=0.25):
        assert M.measure_prefill(tv.model, inputs, timer).kv_bytes < sample.kv_bytes


def test_peak_memory_sees_a_large_allocation():
    with M.PeakMemory("cpu") as mem:
        x = torch.ones(64, 1024, 1024)  # 256 MiB, touched
        del x
    if mem.peak_bytes is not None:  # Linux
        assert mem.peak_bytes >= 200 * 2 ** 20


def test_timed_selection_records_each_image_and_restores_select():
    tv = model("llava")
    inputs = batch_inputs(tv, [0, 1])
    timer = M.Timer("cpu")
    with vtprune.apply(tv.model, "pool", keep=0.5) as handle:
        with M.timed_selection(handle.pruner, timer) as intervals:
            tv.model(**inputs)
        assert len(intervals) == 2 and M.selection_seconds(intervals, timer) > 0
        assert "select" not in vars(handle.pruner)


def test_run_bench_table_and_json():
    tv = model("llava")
    inputs = B.synthetic_inputs(tv.model.config)
    settings = B.make_settings(["random", "pool"], [0.5, 4])
    result = B.run_bench(tv.model, inputs, settings, repeats=2, warmup=1, new_tokens=3, progress=False)
    assert [r.visual for r in result.results] == [(16, 16), (16, 8), (16, 4), (16, 8), (16, 4)]
    for r in result.results[1:]:
        measured, bound = result.speedups(r)
        assert bound > 1 and measured > 0 and len(r.prefill) == 2 and len(r.generate) == 2
    assert result.results[3].flops.overhead == 16 * 64  # pool reports V·D
    assert all(r.peak_bytes is None or r.peak_bytes >= 0 for r in result.results)
    table = result.table()
    assert "unpruned" in table and "pool" in table and len(table.splitlines()) == 2 + len(settings)
    data = result.as_dict()
    assert data["env"]["torch_threads"] == torch.get_num_threads() and data["env"]["attn_implementation"] == "sdpa"
    assert data["results"][0]["speedup"] == 1.0 and data["results"][1]["decode_tokens_per_s"] > 0
    json.dumps(data)


def test_cli_bench_from_config_and_saved_dir(tiny_config_file, tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = main(["bench", "--model", str(tiny_config_file), "--random-weights", "--pruners", "random,uniform",
               "--keep", "0.5", "--site", "layer", "--layer", "2", "--repeats", "1", "--warmup", "0",
               "--no-progress", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "FLOPs-bound" in printed and "K=2" in printed
    rows = json.loads(out.read_text())["results"]
    assert [r["label"] for r in rows] == ["unpruned", "random K=2 keep=0.5", "uniform K=2 keep=0.5"]
    saved = tmp_path / "saved"
    model("llava").model.save_pretrained(saved)
    assert main(["bench", "--model", str(saved), "--keep", "0.25", "--repeats", "1", "--warmup", "0",
                 "--no-progress"]) == 0


def test_shipped_configs_load():
    assert {"bench-small", "llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b"} <= set(B.shipped_configs())
    qwen = B.load_config(B.resolve_model("qwen2.5-vl-7b"))
    dims = LLMDims.from_config(qwen)
    assert (dims.layers, dims.hidden, dims.kv_heads, dims.intermediate) == (28, 3584, 4, 18944)
    small = B.load_config(B.resolve_model("bench-small"))
    inputs = B.synthetic_inputs(small)
    assert int((inputs["input_ids"] == small.image_token_id).sum()) == 576 and inputs["input_ids"].shape[1] == 641
    next_inputs = B.synthetic_inputs(B.load_config(B.resolve_model("llava-next-7b")), image_size=(672, 672))
    assert next_inputs["pixel_values"].shape[:2] == (1, 5)


@pytest.mark.parametrize("argv,message", [
    (["--model", "no-such-model", "--random-weights"], "unknown model 'no-such-model'"),
    (["--model", "bench-small", "--keep", "1.5"], "keep=1.5"),
    (["--model", "bench-small", "--keep", "0"], "keep=0"),
    (["--model", "bench-small", "--pruners", "randmo"], "unknown pruner 'randmo'"),
    (["--model", "bench-small"], "holds no weights"),
    (["--model", "bench-small", "--site", "pre_llm", "--layer", "2"], "only meaningful with site='layer'"),
], ids=["model", "keep-high", "keep-zero", "pruner", "no-weights", "layer-without-site"])
def test_cli_bad_input_gives_a_clear_error(argv, message, capsys):
    assert main(["bench", *argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["bench", "--model", str(bad), "--random-weights"]) == 2
    assert "not supported" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main(["bench", "--model", str(bad), "--random-weights"]) == 2
    assert "cannot read a model config" in capsys.readouterr().err


def test_random_weight_model_too_big_for_memory_is_a_clear_error(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 2**20})())
    with pytest.raises(VTPruneError, match=r"weights need .* GiB .* only 0.0 GiB is free"):
        B.build_model("bench-small", random_weights=True)
