"""Multi-stage in-LLM schedules (several cuts in one prefill, PyramidDrop style): exact like a single cut.

The tiny models have 4 decoder layers, so the schedule cuts at layers 1 / 2 / 3 (Qwen3.5: its first full-attention
layer is 3, so it gets the refusal test instead). Each property is checked on LLaVA, Qwen2-VL and one family with
special layers (Gemma 3's per-layer-type masks, Qwen3-VL's DeepStack)."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from conftest import GEN, batch_inputs, model
from test_core_reference import _capture

import vtprune
from vtprune import flops as F
from vtprune.sites.continuation import ledger_of
from vtprune.testing import shortened_lm_inputs

SCHEDULE = ((1, 0.5), (2, 0.25), (3, 0.125))
FAMS = ["llava", "qwen2_vl", "gemma3", "qwen3_vl"]


def _generate(tv, inputs, **kw):
    out = tv.model.generate(**inputs, **{**GEN, **kw})
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_keep_all_stages_are_bit_identical(family):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    ref = tv.model(**inputs).logits
    ref_seq, ref_step = _generate(tv, inputs)
    with vtprune.apply(tv.model, "random", site="layer", schedule=((1, 10_002), (2, 10_001), (3, 10_000))) as handle:
        assert torch.equal(tv.model(**inputs).logits, ref)
        seq, step = _generate(tv, inputs)
        assert handle.stats.visual_before == handle.stats.visual_after
    assert torch.equal(seq, ref_seq) and torch.equal(step, ref_step)


@pytest.mark.parametrize("family", [*FAMS, "qwen3_5"])
def test_cached_equals_uncached_and_batch_equals_single(family):
    """Decode from the layered cache (layers 1, 2, 3 each cache fewer slots) == uncached generation, and each row
    of a ragged left-padded batch == that sample alone; ``stats`` shows the visual tokens of every layer. Qwen3.5
    (cuts after its first full-attention layer 1): a linear-attention layer group, then a full-attention one."""
    tv = model(family)
    samples = [0, 1]
    schedule = SCHEDULE if family != "qwen3_5" else SCHEDULE[1:]
    with vtprune.apply(tv.model, "random", site="layer", schedule=schedule) as handle:
        seq_c, step_c = _generate(tv, batch_inputs(tv, samples))
        stats = handle.stats
        seq_u, step_u = _generate(tv, batch_inputs(tv, samples), use_cache=False)
        for row, sample in enumerate(samples):
            seq_s, step_s = _generate(tv, batch_inputs(tv, [sample]))
            n_new = GEN["max_new_tokens"]
            assert torch.equal(seq_c[row, -n_new:], seq_s[0, -n_new:])
            torch.testing.assert_close(step_c[row], step_s[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(seq_c, seq_u)
    torch.testing.assert_close(step_c, step_u, atol=1e-5, rtol=1e-5)
    assert stats.decode_steps == GEN["max_new_tokens"] - 1
    for s in stats.samples:
        (v, after), = s.images
        expected = [v] * (4 - len(schedule)) + [max(1, int(keep * v + 0.5)) for _, keep in schedule]
        assert s.layer_visual == expected and after == expected[-1]
        assert [a - b for a, b in itertools.pairwise(s.layer_seq_lens)] == \
               [a - b for a, b in itertools.pairwise(expected)]


@pytest.mark.parametrize("family", FAMS)
def test_multiturn_continues_every_layer_group(family):
    """A later turn on the layered cache (text only) == the whole conversation in one hooked pass; without the
    per-group slot maps (the first group's map for every layer) it is wrong or refused."""
    tv = model(family)
    with vtprune.apply(tv.model, "random", site="layer", schedule=SCHEDULE):
        first = batch_inputs(tv, [0])
        out = tv.model.generate(**first, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        turn = tv.processor(text=[tv.prompt("and what colour is it", 0)], return_tensors="pt")
        ids = torch.cat([out.sequences, turn["input_ids"]], 1)
        whole = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in first:
                whole[key] = torch.cat([first[key], torch.zeros(1, ids.shape[1] - first[key].shape[1],
                                                                dtype=torch.long)], 1)
        whole.update({k: first[k] for k in ("pixel_values", "image_grid_thw") if k in first})
        n_new = ids.shape[1] - out.sequences.shape[1] + 1
        ref = tv.model(**whole).logits[:, -n_new:]
        cache = copy.deepcopy(out.past_key_values)
        assert len(ledger_of(cache).later) == 2
        got = tv.model(input_ids=ids[:, -n_new:], attention_mask=whole["attention_mask"], past_key_values=cache).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        flat = copy.deepcopy(out.past_key_values)
        ledger = ledger_of(flat)
        flat._vtprune_ledger = dataclasses.replace(ledger, later=tuple((l, ledger.plan, ledger.real) for l, _, _ in
                                                                ledger.later))
        try:
            wrong = tv.model(input_ids=ids[:, -n_new:], attention_mask=whole["attention_mask"],
                             past_key_values=flat).logits
        except (RuntimeError, ValueError, vtprune.VTPruneError):
            return
    if family != "gemma3":  # Gemma 3's masks are rebuilt from each layer's own cache length: one unpadded sample
        assert (wrong - ref).abs().max() > 1e-3  # never reads the slot map (its padding is all real)


def _plans(handle) -> list:
    """Record the keep plans the engine's select returns (one per cut)."""
    engine, plans = handle._engine, []
    original = engine.select

    def select(*args, **kwargs):
        plans.append(original(*args, **kwargs))
        return plans[-1]
    engine.select = select
    return plans


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_matches_hand_shortened_layers(family, attn):
    """Prefill == the unhooked decoder layers run by hand: full prompt to layer 1, then each group on its own
    survivors with their original positions. Negative control: positions left ungathered at stage 2 (the stage-1
    positions, truncated) give different logits."""
    tv = model(family, attn)
    inputs = batch_inputs(tv, [1])
    lm = tv.model.model.language_model
    _, lm_kw = _capture(lm, lambda: tv.model(**inputs))
    (hidden,), _ = _capture(lm.layers[1], lambda: tv.model(**inputs))
    pos = lm_kw.get("position_ids")
    pos = torch.arange(hidden.shape[1]).view(1, 1, -1) if pos is None else (pos[None] if pos.dim() == 2 else pos)
    with vtprune.apply(tv.model, "uniform", site="layer", schedule=SCHEDULE) as handle:
        plans = _plans(handle)
        hooked = tv.model(**inputs).logits
        (v, _), = handle.stats.samples[0].images
    kept, index = [], torch.arange(hidden.shape[1])
    for plan in plans:  # each plan indexes the sequence its cut saw
        index = index[plan.index[0]]
        kept.append(index)
    assert [k.numel() for k in kept] == [hidden.shape[1] - v + int(keep * v + 0.5) for _, keep in SCHEDULE]
    assert all(bool(torch.isin(b, a).all()) for a, b in itertools.pairwise(kept))

    def run(ungathered: bool) -> torch.Tensor:
        h, prev = hidden, None
        for stage, (layer_idx, _) in enumerate(SCHEDULE):
            sel = kept[stage]
            h = h[:, torch.isin(prev, sel)] if prev is not None else h[:, sel]
            p = pos[..., sel]
            if ungathered and stage == 1:
                p = pos[..., kept[0]][..., :sel.numel()]
            n = sel.numel()
            causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            mask = causal if attn == "sdpa" else torch.zeros(1, 1, n, n).masked_fill(~causal, torch.finfo(h.dtype).min)
            pe = lm.rotary_emb(h, p[0] if p.shape[0] == 1 else p[-3:])
            h = lm.layers[layer_idx](h, attention_mask=mask, position_embeddings=pe, position_ids=None)
            deepstack = shortened_lm_inputs(lm_kw, sel)  # Qwen3-VL adds DeepStack features after layers 0..2
            if layer_idx < len(deepstack.get("deepstack_visual_embeds", [])):
                h = lm._deepstack_process(h, deepstack["visual_pos_masks"], deepstack["deepstack_visual_embeds"][layer_idx])
            prev = sel
        return tv.model.lm_head(lm.norm(h))

    reference = run(False)
    torch.testing.assert_close(hooked, reference, atol=1e-5, rtol=1e-5)
    assert (run(True) - reference).abs().max() > 1e-3


def test_one_stage_schedule_is_the_single_cut_and_remove_restores():
    tv = model("qwen2_vl")
    inputs = batch_inputs(tv, [0, 1])
    ref = tv.model(**inputs).logits
    with vtprune.apply(tv.model, "uniform", keep=0.4, site="layer", layer=2):
        single = tv.model(**inputs).logits
    with vtprune.apply(tv.model, "uniform", site="layer", schedule=[[2, 0.4]]) as handle:
        assert torch.equal(tv.model(**inputs).logits, single)
        assert (handle.config.layer, handle.config.keep, handle.config.schedule) == (2, 0.4, ((2, 0.4),))
    handle = vtprune.apply(tv.model, "uniform", site="layer", schedule=SCHEDULE)
    assert not torch.equal(tv.model(**inputs).logits, ref)
    handle.remove()
    assert torch.equal(tv.model(**inputs).logits, ref)


@pytest.mark.parametrize("name", sorted(n for n in vtprune.list_pruners()
                                        if "layer" in vtprune.registry.pruner_class(n).sites and n != "informed"))
def test_every_method_at_every_stage_keeps_its_budget(name):
    """Any in-LLM method runs at later cuts, on the tokens still present (restricted layout and signals)."""
    tv = model("llava")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, name, site="layer", schedule=SCHEDULE) as handle:
        tv.model(**inputs)
        assert [s.layer_visual for s in handle.stats.samples] == [[16, 8, 4, 2]] * 2


def test_flops_per_stage_match_flop_counter():
    tv = model("qwen2_vl")
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, "random", site="layer", schedule=SCHEDULE) as handle:
        measured = F.measured_flops(lambda: tv.model(**inputs))
        report = F.flops_from_stats(tv.model, handle.stats, inputs=inputs, logits_to_keep=0)
        stages = F.stage_flops(tv.model, handle.stats)
    assert abs(report.prefill_total - measured) <= 0.02 * measured
    assert [s["layers"] for s in stages] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert sum(s["llm_linear"] + s["llm_attention"] for s in stages) == \
           report.prefill["llm_linear"] + report.prefill["llm_attention"]
    assert [s["visual"] for s in stages] == [[16], [8], [4], [2]]


def test_selection_overhead_counts_every_cut():
    """FastV's ``2·V·D`` per image and cut, each on the tokens the cut saw (16, 8, 4)."""
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, "fastv", schedule=SCHEDULE) as handle:
        tv.model(**inputs)
        report = F.flops_from_stats(tv.model, handle.stats, pruner="fastv")
        assert handle.stats.samples[0].image_cuts == [[16, 8, 4, 2]]
    assert report.overhead == 2 * (16 + 8 + 4) * F.LLMDims.from_config(tv.model).hidden


def test_pdrop_flops_reproduce_the_paper_table():
    """PDrop's table formula on LLaVA-1.5-7B: 3.82 T vanilla, 1.78 T for layers 8/16/24 with λ = 0.5."""
    d, m = 4096, 11008
    assert round(F.pdrop_flops([576] * 32, d, m) / 1e12, 2) == 3.82
    assert round(F.pdrop_flops([576] * 8 + [288] * 8 + [144] * 8 + [72] * 8, d, m) / 1e12, 2) == 1.78


@pytest.mark.parametrize("schedule,error", [
    ([], "non-empty"), ([(2, 0.5), (2, 0.25)], "strictly increase"), ([(1, 0.5), (2, 0.5)], "strictly decrease"),
    ([(1, 0.5), (2, 4)], "fraction"), ([(0, 0.5)], "int >= 1"), ([(1, 1.5)], "(0, 1]"), ([(1, 0.5, 2)], "pair"),
    ("8:0.5", "non-empty list"),
])
def test_bad_schedules_are_refused(schedule, error):
    with pytest.raises(vtprune.VTPruneError, match=error.replace("(", r"\(").replace("]", r"\]")):
        vtprune.apply(model("llava").model, "random", site="layer", schedule=schedule)


def test_schedule_conflicts_and_ranges_are_refused():
    tv = model("llava")
    with pytest.raises(vtprune.VTPruneError, match="out of range"):
        vtprune.apply(tv.model, "random", site="layer", schedule=[(1, 0.5), (4, 0.25)])
    with pytest.raises(vtprune.VTPruneError, match="first cut"):
        vtprune.apply(tv.model, "random", site="layer", schedule=[(1, 0.5), (2, 0.25)], keep=0.3)
    with pytest.raises(vtprune.VTPruneError, match="first cut"):
        vtprune.apply(tv.model, "random", site="layer", schedule=[(1, 0.5), (2, 0.25)], layer=3)
    with pytest.raises(vtprune.VTPruneError, match="site='layer'"):
        vtprune.apply(tv.model, "random", site="pre_llm", schedule=[(1, 0.5)])
    with pytest.raises(vtprune.VTPruneError, match="use one cut"):
        vtprune.apply(tv.model, "informed", site="layer", schedule=[(1, 0.5), (2, 0.25)])
    with pytest.raises(vtprune.VTPruneError, match="first full-attention layer"):
        vtprune.apply(model("qwen3_5").model, "random", site="layer", schedule=[(1, 0.5), (3, 0.25)])


def test_a_cache_of_another_schedule_is_refused():
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, "random", site="layer", schedule=SCHEDULE):
        out = tv.model(**inputs, use_cache=True)
    step = {"input_ids": inputs["input_ids"][:, -1:], "past_key_values": out.past_key_values,
            "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)}
    with vtprune.apply(tv.model, "random", keep=0.5, site="layer", layer=1), \
            pytest.raises(vtprune.VTPruneError, match="same schedule|schedule that wrote it"):
        tv.model(**step)


def test_yaml_form(tmp_path):
    """A sweep entry gives a schedule as an option (keep = the first cut's); a bad one fails at its field."""
    from vtprune.harness.cells import settings_of
    from vtprune.harness.schema import ConfigError, load_config

    base = "models: [{tiny: llava}]\ntasks: [{synthetic: shapes, size: 4}]\npruners:\n"
    path = tmp_path / "ok.yaml"
    path.write_text(base + "  - {name: fastv, keep: 0.5, options: {schedule: [[1, 0.5], [2, 0.25], [3, 0.125]]}}\n"
                           "  - {name: pyramiddrop, keep: [0.25, 0.125], options: {layers: [1, 3]}}\n")
    fastv, pdrop = (settings_of(spec) for spec in load_config(path).pruners)
    assert fastv[0].method.startswith("fastv K=1 schedule=") and fastv[0].pruner_config(0).schedule == SCHEDULE
    assert [s.method for s in pdrop] == ["pyramiddrop layers=[1, 3]"] * 2
    path.write_text(base + "  - {name: fastv, keep: 0.5, options: {schedule: [[1, 0.5], [1, 0.25]]}}\n"
                           "  - {name: fastv, keep: 0.3, options: {schedule: [[1, 0.5], [2, 0.25]]}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "pruners[0].options.schedule: schedule[1]: layer 1 after layer 1" in str(e.value)
    assert "pruners[1].keep: keep=0.3 and schedule=" in str(e.value)


def test_later_cuts_read_layer_k_minus_1_of_the_survivors():
    """FastV at cut 2 (layer 2) reads layer 1's q/k over the tokens cut 1 kept: one key per surviving real token,
    the image columns where the survivors sit."""
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, "fastv", schedule=SCHEDULE[:2]) as handle:
        seen = []
        stage = handle._engine.site.stages[1]
        original = stage.pruner.select
        stage.pruner.select = lambda view, k: seen.append(view) or original(view, k)
        tv.model(**inputs)
    qk = seen[0].extras["llm_qk"]
    n = inputs["input_ids"].shape[1] - 16 + 8
    assert qk.key.shape[-2] == qk.query.shape[-2] == n and seen[0].num_tokens == 8
    assert qk.image.tolist() == list(range(int(qk.image[0]), int(qk.image[0]) + 8))  # the survivors, contiguous


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_later_turn_with_a_new_image_on_the_layered_cache(family):
    """A later turn brings a new image into the layered cache: each layer group appends its own cut of it to its
    own slots; == the whole conversation with both images in one hooked pass (``random`` draws per token count,
    so each image gets the same tokens at each cut either way)."""
    from test_multiturn import STEP, _conversation, _tokens_only, _turn_one

    tv = model(family)
    with vtprune.apply(tv.model, "random", site="layer", schedule=SCHEDULE) as handle:
        first, out = _turn_one(tv, {}, batch=1)
        whole, extra = _conversation(tv, first, out.sequences, second_image=True)
        cache = copy.deepcopy(out.past_key_values)
        cont = tv.model.generate(**_tokens_only(whole), **extra, past_key_values=cache, max_new_tokens=3, **STEP)
        (v, _), = handle.stats.samples[0].images
        assert handle.stats.samples[0].layer_visual[1:] == [int(k * v + 0.5) for _, k in SCHEDULE]
        fresh = tv.model.generate(**whole, max_new_tokens=3, **STEP)
    assert torch.equal(cont.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(cont.logits, 1), torch.stack(fresh.logits, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:vtprune. static-cache")
def test_static_cache_equals_dynamic():
    """A fixed-length cache (every layer group writes its own slots into the same-size cache) decodes the same."""
    tv = model("qwen2_vl")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "random", site="layer", schedule=SCHEDULE):
        seq_d, step_d = _generate(tv, inputs)
        seq_s, step_s = _generate(tv, inputs, cache_implementation="static")
    assert torch.equal(seq_d, seq_s)
    torch.testing.assert_close(step_d, step_s, atol=1e-5, rtol=1e-5)


def test_labels_follow_every_cut():
    """The model's own loss runs on the labels of the tokens the last cut kept (image labels -100)."""
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    ids = inputs["input_ids"]
    image = ids == tv.model.config.image_token_id
    labels = ids.masked_fill(image, -100)
    with vtprune.apply(tv.model, "random", site="layer", schedule=SCHEDULE):
        out = tv.model(**inputs, labels=labels)
    first = int(image[0].nonzero()[0])
    kept = torch.cat([labels[0, :first], torch.full((2,), -100), labels[0, first + 16:]])  # 16 -> 8 -> 4 -> 2
    assert out.logits.shape[1] == kept.numel()
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), kept[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("family, samples", [("llava_next", "images"), ("qwen3_vl", [0, 1]), ("qwen2_vl", [1, 3])])
def test_later_cuts_know_the_text_after_each_item_without_reading_it(family, samples):
    """DART's text pivots and SparseVLM's raters are the text after an item, counted once before layer 0: a later cut
    keeps that count for an item with no text inside its span (it reads nothing) and counts anew where text sits
    inside (Qwen3-VL's video timestamps). Either way the count is the text after the item's survivors, as read."""
    from test_video import video_inputs
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1]) if samples == "images" else video_inputs(tv, samples)
    seen = []
    with vtprune.apply(tv.model, "dart", schedule=((1, 0.5), (3, 0.25))) as handle:
        for stage in handle._engine.site.stages:
            stage.pruner.select = lambda view, k, _s=stage.pruner.select: seen.append(view) or _s(view, k)
        tv.model(**inputs)
    assert len(seen) >= 4
    later = [v for v in seen if v.layer == 3]
    for view in seen:
        qk = view.extras["llm_qk"]
        if qk.text_after is not None:  # what the site counted is what a read finds
            assert qk.text_after == int((qk.text > qk.image.max()).sum())
    inside = [v.layout.is_video and family == "qwen3_vl" for v in later]
    assert [v.extras["llm_qk"].text_after is None for v in later] == inside  # counted anew only with text inside
