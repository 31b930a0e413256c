"""Public API behaviour: configs, registry, errors on bad input, stats, remove(), layouts, edge inputs."""

from __future__ import annotations

import pytest
import torch

import vtprune
from conftest import GEN, batch_inputs, image_for, model
from vtprune import VTPruneError
from vtprune.ops import pooled_grid, split_budget
from vtprune.registry import _REGISTRY
from vtprune.testing import FAMILIES
from vtprune.view import budget


def test_list_pruners_and_config_objects():
    assert {"random", "uniform", "pool"} <= set(vtprune.list_pruners())
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, vtprune.RandomConfig(keep=4, seed=3)) as h:
        a = tv.model(**inputs).logits
        assert h.stats.visual_after == [4]
    with vtprune.apply(tv.model, "random", keep=4, seed=3):
        assert torch.equal(tv.model(**inputs).logits, a)
    with vtprune.apply(tv.model, "random", keep=4, seed=4):
        assert not torch.equal(tv.model(**inputs).logits, a)


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep=0), "int keep"),
    (dict(keep=-3), "int keep"),
    (dict(keep=0.0), "float keep"),
    (dict(keep=1.5), "float keep"),
    (dict(keep=True), "keep must be"),
    (dict(keep="half"), "keep must be"),
    (dict(site="middle"), "site="),
    (dict(positions="shuffled"), "positions="),
    (dict(site="layer", layer=0), "layer=0"),
    (dict(layer=2), "only meaningful with site='layer'"),
    (dict(site="layer", layer=2, positions="compact"), "compact"),
    (dict(foo=1), r"unknown option\(s\) \['foo'\].*valid options"),
])
def test_bad_options_are_clear_errors(kwargs, match):
    tv = model("llava")
    with pytest.raises(VTPruneError, match=match):
        vtprune.apply(tv.model, "random", **kwargs)


def test_unknown_pruner_suggests_names():
    with pytest.raises(VTPruneError, match="unknown pruner 'randm'.*Did you mean random"):
        vtprune.apply(model("llava").model, "randm", keep=0.5)


def test_layer_out_of_range():
    tv = model("llava")
    with pytest.raises(VTPruneError, match=r"K must be in \[1, 3\]"):
        vtprune.apply(tv.model, "random", keep=0.5, site="layer", layer=4)


def test_unsupported_model_lists_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(VTPruneError, match="unsupported model LlamaForCausalLM.*LlavaForConditionalGeneration"):
        vtprune.apply(llm, "random", keep=0.5)
    with pytest.raises(VTPruneError, match="unsupported model Linear"):
        vtprune.apply(torch.nn.Linear(2, 2), "random", keep=0.5)


def test_double_apply_is_refused_and_handle_is_single_use():
    tv = model("llava")
    h = vtprune.apply(tv.model, "random", keep=0.5)
    with pytest.raises(VTPruneError, match="already has vtprune hooks"):
        vtprune.apply(tv.model, "pool", keep=0.5)
    h.remove()
    h.remove()  # idempotent
    with pytest.raises(VTPruneError, match="removed"):
        _ = h.stats
    vtprune.apply(tv.model, "pool", keep=0.5).remove()


@pytest.mark.parametrize("site", [{"site": "pre_llm"}, {"site": "layer", "layer": 2}])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_changes_output_and_remove_restores_bit_exact(family, site):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    ref = tv.model(**inputs).logits
    ref_gen = tv.model.generate(**inputs, **GEN).sequences
    hooks_before = _hook_count(tv.model)
    handle = vtprune.apply(tv.model, "random", keep=0.25, **site)
    pruned = tv.model(**inputs).logits
    tv.model.generate(**inputs, **GEN)
    assert pruned.shape[1] < ref.shape[1]  # logits come back for the kept tokens only
    assert not torch.allclose(pruned[:, -1], ref[:, -1])
    handle.remove()
    assert _hook_count(tv.model) == hooks_before
    assert torch.equal(tv.model(**inputs).logits, ref)
    assert torch.equal(tv.model.generate(**inputs, **GEN).sequences, ref_gen)


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_input_runs_unpruned(family):
    tv = model(family)
    tok = tv.processor.tokenizer
    inputs = tok(["what is the colour", "how many red circle are there"], return_tensors="pt", padding=True)
    ref = tv.model(**inputs).logits
    with vtprune.apply(tv.model, "random", keep=0.25) as h:
        assert torch.equal(tv.model(**inputs).logits, ref)
        assert h.stats.visual_before == [0, 0] == h.stats.visual_after


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_inputs_embeds_without_input_ids_locates_images(family):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    ids = inputs.pop("input_ids")
    by_embeds = dict(inputs, inputs_embeds=tv.model.get_input_embeddings()(ids))
    with vtprune.apply(tv.model, "uniform", keep=0.5) as h:
        a = tv.model(**inputs, input_ids=ids).logits
        b = tv.model(**by_embeds).logits
        assert h.stats.visual_after[0] < h.stats.visual_before[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("site", [{"site": "pre_llm"}, {"site": "layer", "layer": 2}])
@pytest.mark.parametrize("family", FAMILIES)
def test_stats_record_what_each_layer_processed(family, site):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    real = inputs["attention_mask"].sum(1).tolist()
    with vtprune.apply(tv.model, "uniform", keep=0.5, **site) as h:
        tv.model(**inputs)
        st = h.stats
    assert st.site == site["site"] and st.prefill_calls == 1
    n_layers = tv.model.config.text_config.num_hidden_layers
    K = site.get("layer", 0)
    for sample, n_real in zip(st.samples, real):
        kept = n_real - sample.visual_before + sample.visual_after
        assert sample.layer_seq_lens == [n_real] * K + [kept] * (n_layers - K)
        assert all(after == budget(0.5, before) for before, after in sample.images)
    # original padding is dropped with the pruned tokens: the batch is only as long as its longest kept row
    assert st.padded_layer_seq_lens[-1] == max(n - s.visual_before + s.visual_after for n, s in zip(real, st.samples))
    assert st.as_dict()["samples"][0]["visual_after"] == st.samples[0].visual_after


def test_budget_rules():
    assert budget(1.0, 576) == 576
    assert budget(0.11, 576) == 63  # round half up of 63.36
    assert budget(0.25, 10) == 3  # 2.5 rounds up
    assert budget(0.001, 10) == 1  # never zero
    assert budget(64, 16) == 16  # int capped by what the image has
    assert split_budget(10, [16, 4]) == [8, 2]
    assert sum(split_budget(7, [5, 5, 5])) == 7
    for rows, cols, k in [(24, 24, 64), (4, 4, 3), (3, 7, 5), (12, 12, 144), (1, 9, 4)]:
        r, c = pooled_grid(rows, cols, k)
        assert r * c >= k and r <= rows and c <= cols


class _Recorder(vtprune.Pruner):
    config_class = type("RecordConfig", (vtprune.UniformConfig,), {"name": "_test_record"})
    views: list = []

    def select(self, view, k):
        _Recorder.views.append(view)
        from vtprune.ops import lattice
        return lattice(view.num_tokens, k)


@pytest.fixture
def recorder():
    vtprune.register_pruner(_Recorder)
    _Recorder.views = []
    yield _Recorder
    del _REGISTRY["_test_record"]


@pytest.mark.parametrize("family", FAMILIES)
def test_layouts_match_the_processor_grids(family, recorder):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "_test_record", keep=0.5):
        tv.model(**inputs)
    n_forward = len(recorder.views)
    with vtprune.apply(tv.model, "_test_record", keep=0.5):
        tv.model.generate(**inputs, **GEN)  # generate passes pre-encoded features, no sizes
    fwd, gen = recorder.views[:n_forward], recorder.views[n_forward:]
    assert [v.layout for v in fwd] == [v.layout for v in gen]
    if family == "llava":
        expected = [((4, 4, False),)] * 2
    elif family == "llava_next":  # base 4x4 view + unpadded crop grid with newline tokens
        expected = [((4, 4, False), (8, 8, True)), ((4, 4, False), (4, 8, True))]
    elif family == "llava_onevision":  # base view + unpadded crop grid (2x2 views: resized 8x8 -> 5x5), newlines
        expected = [((4, 4, False), (5, 5, True)), ((4, 4, False), (4, 8, True))]
    elif family == "internvl":  # one 2x2 grid per view: the processor's tiles, then a thumbnail if several
        improc = tv.processor.image_processor
        images = [image_for(family, i) for i in (0, 1)]
        views = [improc.get_number_of_image_patches(im.height, im.width) for im in images]
        expected = [((2, 2, False),) * v for v in views]
    elif family == "gemma3":  # one 2x2 grid per view (no pan-and-scan by default)
        expected = [((2, 2, False),)] * 2
    else:  # image_grid_thw // 2
        thw = inputs["image_grid_thw"].tolist()
        expected = [((h // 2, w // 2, False),) * t for t, h, w in thw]
    assert [tuple((s.rows, s.cols, s.newline) for s in v.layout.segments) for v in fwd] == expected
    assert all(v.layout.size == v.num_tokens for v in fwd)
    view = fwd[1]
    assert view.sample == 1 and view.text.shape[0] == int(inputs["attention_mask"][1].sum()) - view.num_tokens


def test_a_prefill_extending_the_last_one_reuses_its_selection(recorder):
    """Uncached generation re-runs prefill on a growing prompt: the images keep the selection made for the
    original prompt (so prompt-dependent pruners agree with cached decoding); a new prompt selects anew."""
    tv = model("llava")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "_test_record", keep=0.5):
        tv.model.generate(**inputs, **GEN, use_cache=False)
        assert len(recorder.views) == 2  # one selection per image, at the first step only
        other = batch_inputs(tv, [2, 1])
        tv.model(**other)
        assert len(recorder.views) == 4


def test_readme_custom_pruner_example_runs():
    """The README's "write your own" snippet registers a working pruner."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), re.S) if "register_pruner" in b)
    exec(block, {"vtprune": vtprune, "torch": torch})
    try:
        tv = model("llava")
        with vtprune.apply(tv.model, "norm", keep=0.5) as h:
            tv.model(**batch_inputs(tv, [0]))
            assert h.stats.visual_after == [8]
    finally:
        del _REGISTRY["norm"]
