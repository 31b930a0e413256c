"""FLOPs accounting: the FastV convention reproduces the spec's worked example, and the exact count equals what
``FlopCounterMode`` measures on real forwards (every family; unpruned, pre-LLM and in-LLM; batches; decoding)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import batch_inputs, model

import vtprune
from vtprune import flops as F
from vtprune.errors import VTPruneError
from vtprune.testing import FAMILIES

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
CASES = {"unpruned": None, "pre_llm": {"site": "pre_llm"}, "layer2": {"site": "layer", "layer": 2}}


def _vicuna_7b() -> transformers.LlamaConfig:
    """LLaVA-1.5-7B's LLM as a plain config object (no weights)."""
    return transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, vocab_size=32064)


def _shipped(name: str):
    data = json.loads((CONFIGS / f"{name}.json").read_text())
    return transformers.AutoConfig.for_model(data.pop("model_type"), **data)


# ---- FastV convention -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_lens,tflops", [
    ([641] * 32, 3.33),  # full model, n = 35 + 576 + 30
    ([641 - 576 + 64] * 32, 0.65),  # pre-LLM pruning to 64 / 128 / 192 visual tokens
    ([641 - 576 + 128] * 32, 0.98),
    ([641 - 576 + 192] * 32, 1.31),
    ([641] * 2 + [641 - 288] * 30, 1.90),  # FastV K=2, R=50%
], ids=["full", "pre64", "pre128", "pre192", "fastv-k2-r50"])
def test_fastv_worked_example(layer_lens, tflops):
    assert round(F.fastv_flops(_vicuna_7b(), layer_lens) / 1e12, 2) == tflops
    assert round(F.count_flops(_vicuna_7b(), [layer_lens]).fastv_tflops, 2) == tflops


def test_shipped_llava_config_gives_the_worked_example():
    cfg = _shipped("llava-1.5-7b")
    assert round(F.fastv_flops(cfg, [641] * 32) / 1e12, 2) == 3.33
    report = F.count_flops(cfg, [[641] * 32], vision=F.VisionWork(views=1), logits_to_keep=1)
    # exact count, LLM part: 2 FLOPs per MAC, gated FFN (3ndm) -> a bit above 2x the FastV number
    llm = report.prefill["llm_linear"] + report.prefill["llm_attention"]
    assert llm == 2 * sum(4 * 641 * 4096 ** 2 + 2 * 641 ** 2 * 4096 + 3 * 641 * 4096 * 11008 for _ in range(32))
    assert report.prefill["vision"] > 0 and report.prefill["projector"] == 2 * 576 * (1024 * 4096 + 4096 * 4096)


# ---- exact count == FlopCounterMode ---------------------------------------------------------------------
def _measure_and_count(tv, inputs, case, **count_kw):
    """(measured FLOPs of one plain forward, our report) under ``case``."""
    if case is None:
        measured = F.measured_flops(lambda: tv.model(**inputs))
        return measured, F.flops_unpruned(tv.model, inputs, logits_to_keep=0, **count_kw)
    with vtprune.apply(tv.model, "random", keep=0.5, **case) as handle:
        measured = F.measured_flops(lambda: tv.model(**inputs))
        return measured, F.flops_from_stats(tv.model, handle.stats, inputs=inputs, logits_to_keep=0, **count_kw)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_count_matches_flop_counter(family, case):
    tv = model(family)
    measured, report = _measure_and_count(tv, batch_inputs(tv, [0]), CASES[case])
    assert report.decode == [] and report.vision_counted
    assert abs(report.prefill_total - measured) <= 0.02 * measured, (report.prefill, measured)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_flop_counter(family):
    """A ragged left-padded batch: the kernels run on padded lengths, which ``padded=True`` counts."""
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    measured, report = _measure_and_count(tv, inputs, CASES["layer2"], padded=True)
    assert abs(report.prefill_total - measured) <= 0.02 * measured
    _, real = _measure_and_count(tv, inputs, CASES["layer2"])
    assert real.fastv == report.fastv  # FastV always counts real tokens
    assert real.prefill["llm_linear"] <= report.prefill["llm_linear"]


def test_eager_attention_matches_flop_counter():
    """Eager attention runs QKᵀ/AV as matmuls over the full rectangle: the same count as SDPA."""
    tv = model("llava", "eager")
    measured, report = _measure_and_count(tv, batch_inputs(tv, [0]), CASES["pre_llm"])
    assert abs(report.prefill_total - measured) <= 0.02 * measured


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_prefill_plus_decode_matches_flop_counter(family):
    """``generate`` = prefill with ``logits_to_keep=1`` + decode steps attending to each layer's KV length."""
    tv = model(family)
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, "uniform", keep=0.5, site="layer", layer=2) as handle:
        measured = F.measured_flops(lambda: tv.model.generate(**inputs, max_new_tokens=4, do_sample=False))
        report = F.flops_from_stats(tv.model, handle.stats, inputs=inputs)
        steps, lens = handle.stats.decode_steps, handle.stats.samples[0].layer_seq_lens
    assert len(report.decode) == steps == 3
    cost = F.layer_cost(tv.model)  # the LLaMA formula, or the family's own layers (linear attention, MoE)
    assert report.decode[0]["llm_attention"] == sum(cost(layer, 1, n + 1)[1] for layer, n in enumerate(lens))
    assert report.decode_per_step[2] > report.decode_per_step[0]  # the KV cache grows
    assert abs(report.total - measured) <= 0.02 * measured


# ---- conventions and components -------------------------------------------------------------------------
def test_causal_counts_only_the_triangle():
    cfg = _vicuna_7b()
    full = F.count_flops(cfg, [[100] * 32]).prefill["llm_attention"]
    causal = F.count_flops(cfg, [[100] * 32], causal=True)
    assert full == 32 * 4 * 4096 * 100 * 100
    assert causal.prefill["llm_attention"] == 32 * 2 * 4096 * 100 * 101 and causal.causal


def test_gqa_and_lm_head():
    cfg = transformers.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
    dims = F.LLMDims.from_config(cfg)
    assert dims.head_dim == 128
    assert dims.linear_per_token() == 2 * (2 * 3584 ** 2 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    all_logits = F.count_flops(cfg, [[10] * 28], logits_to_keep=0).prefill["lm_head"]
    assert all_logits == 10 * F.count_flops(cfg, [[10] * 28], logits_to_keep=1).prefill["lm_head"]


def test_qwen25_windows_match_transformers():
    """Window attention cost uses the real window partition, including partial windows at the edges."""
    from transformers.vision_utils import get_vision_window_index

    cfg = _shipped("qwen2.5-vl-7b")
    vc = cfg.vision_config
    grid = (1, 48, 36)  # 672 x 504 px: 24 x 18 merged cells, windows of 4 x 4 cells, partial ones at the edge
    _, cu = get_vision_window_index(torch.tensor([grid]), vc.spatial_merge_size, vc.window_size, vc.patch_size)
    window_sq = int(((cu[1:] - cu[:-1]).long() ** 2).sum())
    n, e = 48 * 36, vc.hidden_size
    expected_attn = 4 * e * (4 * n * n + 28 * window_sq)  # 4 full-attention blocks, 28 windowed
    linear = 2 * n * e * (3 * 2 * 14 * 14) + 32 * 2 * n * (4 * e * e + 3 * e * vc.intermediate_size)
    got = F.vision_flops(cfg, F.VisionWork(grids=(grid,)))
    assert got["vision"] == linear + expected_attn
    assert got["projector"] == 2 * (n // 4) * ((4 * e) ** 2 + 4 * e * 3584)


def test_overhead_from_the_pruner_class(monkeypatch):
    stats_images = [(576, 64), (576, 576)]  # the second image kept everything: never reached the pruner
    assert F.pruner_overhead_flops("pool", stats_images, 4096) == 576 * 4096
    assert F.pruner_overhead_flops("random", stats_images, 4096) == 0
    assert F.pruner_overhead_flops("divprune", stats_images, 8) == 2 * 576 * 576 * 8
    assert F.pruner_overhead_flops("kcenter", stats_images, 8) == 2 * 576 * 8 * 64
    assert F.pruner_overhead_flops("pagerank", stats_images, 8) is None  # alias; encoder work has no formula
    assert F.pruner_overhead_flops("no-such-pruner", stats_images, 4096) is None
    formula = classmethod(lambda cls, v, k, d: v * d)
    monkeypatch.setattr(vtprune.methods.uniform.UniformPruner, "overhead_flops", formula)
    assert F.pruner_overhead_flops("uniform", stats_images, 8) == 576 * 8
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, "pool", keep=0.5) as handle:
        tv.model(**inputs)
        report = F.flops_from_stats(tv.model, handle.stats, pruner="pool")
    assert report.overhead == 16 * 64 and report.prefill_total == sum(report.prefill.values()) + 16 * 64
    assert not report.vision_counted and report.prefill["vision"] == 0
    assert json.dumps(report.as_dict())


def test_bad_input_is_rejected():
    with pytest.raises(VTPruneError, match="lacks"):
        F.LLMDims.from_config(SimpleNamespace(hidden_size=8))
    with pytest.raises(VTPruneError, match="per-layer lengths"):
        F.fastv_flops(_vicuna_7b(), [10] * 31)
    with pytest.raises(VTPruneError, match="no vision FLOPs formula"):
        F.vision_flops(_vicuna_7b(), F.VisionWork(views=1))
    with pytest.raises(VTPruneError, match="no prefill"):
        F.flops_from_stats(_vicuna_7b(), vtprune.PruneStats(site="pre_llm", layer=None))
    with pytest.raises(VTPruneError, match=">= 0"):
        F.count_flops(_vicuna_7b(), [[10] * 32], decode_steps=-1)
