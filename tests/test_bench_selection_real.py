"""bench/selection_overhead_real.py: its real-proportion configs (checked without building a 7B model) and its
plumbing on the tiny models. Timings are never asserted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
import transformers
from bench_scripts import bench_script

from vtprune.benchmark import load_config, synthetic_inputs
from vtprune.models import family_class


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The script, imported from its file."""
    with bench_script("selection_overhead_real") as module:
        yield module


@pytest.mark.parametrize("case, visual", [(0, 576), (1, 2928), (2, 576), (3, 2880)])
def test_real_cases_keep_real_widths_and_token_counts(bench, tmp_path, case, visual):
    c = bench.CASES[case]
    data = bench.reduced_config(c.model, 3)
    path = tmp_path / "reduced.json"
    path.write_text(json.dumps(data))
    config = load_config(path)
    real = load_config(bench.resolve_model(c.model))
    text, real_text = config.text_config, real.text_config
    assert text.num_hidden_layers == 3 and bench.real_layers(c.model) == real_text.num_hidden_layers >= 28
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(text, key) == getattr(real_text, key), key
    assert config.vision_config.hidden_size == real.vision_config.hidden_size
    ids = synthetic_inputs(config, image_size=c.image)["input_ids"]
    assert int((ids == config.image_token_id).sum()) == visual
    cls = getattr(transformers, family_class(config.model_type).model_classes[0])
    with torch.device("meta"):  # the reduced real-width model builds (no memory allocated)
        model = cls._from_config(config)
    assert len(model.model.language_model.layers) == 3


def test_tiny_run_reports_each_method_against_the_scaled_prefill(bench, tmp_path):
    out = tmp_path / "sel.json"
    record = bench.main(["--tiny", "--repeats", "1", "--methods", "random,fastv,zoo",
                         "--models", "llava-next-7b,qwen2.5-vl-7b", "--json", str(out)])
    assert json.loads(out.read_text())["keeps"] == list(record["keeps"])
    results = record["results"]
    assert [r["model"] for r in results.values()] == ["llava-next-7b", "qwen2.5-vl-7b", "qwen2.5-vl-7b"]
    for r in results.values():
        assert r["tiny"] and r["llm_scale"] == r["real_layers"] / r["built_layers"] > 1
        assert r["llm_prefill_s"] == pytest.approx(r["llm_measured_s"] * r["llm_scale"])
        rows = {row["label"]: row for row in r["rows"]}
        assert list(rows) == ["random", "fastv", "zoo", "zoo rank=128"]
        assert rows["fastv"]["site"] == "layer" and rows["zoo"]["site"] == "pre_llm"
        for row in rows.values():
            assert all(row[k] >= 0 for k in record["keeps"]) and row["visual"] == r["visual"]
