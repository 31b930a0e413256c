"""What only Gemma 3 has: per-layer-type masks with bidirectional image blocks, sliding-window layers with their
own cache, per-layer-type rotary tables, pan-and-scan views. Every reference is the stock model (its own mask
functions, layers and rotary embedding) on the hand-shortened input, and every test has a negative control that
fails when the family-specific part is left out."""

from __future__ import annotations

import pytest
import torch
from conftest import ATTN, GEN, batch_inputs, model
from test_core_reference import _capture, _uniform_keep
from transformers.models.gemma3.modeling_gemma3 import (
    create_masks_for_vision_model,
    get_block_sequence_ids_for_mask,
)

import vtprune
from vtprune.flops import flops_from_stats, measured_flops
from vtprune.models.gemma3 import PAN_AND_SCAN
from vtprune.testing import random_image

K = 2


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-3)


def _masks(tv, embeds: torch.Tensor, types: torch.Tensor | None) -> dict:
    """The masks the stock model builds for a no-padding input of ``embeds`` with ``types`` (None: no blocks)."""
    blocks = torch.full(embeds.shape[:2], -1) if types is None else get_block_sequence_ids_for_mask(types)
    return create_masks_for_vision_model(config=tv.model.config.text_config, inputs_embeds=embeds,
                                         attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                         past_key_values=None, position_ids=None, block_sequence_ids=blocks)


def _tail(tv, hidden: torch.Tensor, pos: torch.Tensor, masks: dict, one_table: bool = False) -> torch.Tensor:
    """Logits of decoder layers K.. run on ``hidden`` (stock layers, each type's rotary table and mask)."""
    lm = tv.model.model.language_model
    types = tv.model.config.text_config.layer_types
    pe = {t: lm.rotary_emb(hidden, pos, "full_attention" if one_table else t) for t in set(types)}
    h = hidden
    for i in range(K, len(lm.layers)):
        h = lm.layers[i](h, attention_mask=masks[types[i]], position_embeddings=pe[types[i]], position_ids=pos)
    return tv.model.lm_head(lm.norm(h))


@pytest.mark.parametrize("attn", ATTN)
def test_layer_site_matches_the_stock_layers_on_the_kept_tokens(attn):
    """Layers >= K on the kept tokens: each layer gets its type's rotary table, original positions, and the mask the
    model builds on the kept tokens alone (image blocks of the kept tokens, windows counting kept tokens)."""
    tv = model("gemma3", attn)
    inputs = batch_inputs(tv, [1])
    lm = tv.model.model.language_model
    _, lm_kw = _capture(lm, lambda: tv.model(**inputs))
    (hidden_k,), _ = _capture(lm.layers[K], lambda: tv.model(**inputs))
    keep = _uniform_keep(tv, inputs, 0.5)  # 2 of each view's 4 tokens: a block of two
    n = keep.numel()
    assert n > tv.model.config.text_config.sliding_window  # the windows bind
    h, pos, types = hidden_k[:, keep], keep[None], inputs["token_type_ids"][:, keep]
    reference = _tail(tv, h, pos, _masks(tv, h, types))
    with vtprune.apply(tv.model, "uniform", keep=0.5, site="layer", layer=K):
        hooked = tv.model(**inputs).logits
    torch.testing.assert_close(hooked, reference, atol=1e-5, rtol=1e-5)
    # negative controls: no image block; original-distance windows (the full-length masks gathered); one table
    assert _differs(_tail(tv, h, pos, _masks(tv, h, None)), reference)
    gathered = {t: m[:, :, keep][..., keep] for t, m in lm_kw["attention_mask"].items()}
    assert _differs(_tail(tv, h, pos, gathered), reference)
    assert _differs(_tail(tv, h, pos, _masks(tv, h, types), one_table=True), reference)


def _shortened(tv, inputs: dict, keep: torch.Tensor) -> dict:
    """The backbone's inputs for the hand-shortened prompt: kept embeddings, original positions, kept types."""
    _, lm_kw = _capture(tv.model.model.language_model, lambda: tv.model(**inputs))
    return {"inputs_embeds": lm_kw["inputs_embeds"][:, keep], "position_ids": keep[None],
                "attention_mask": torch.ones(1, keep.numel(), dtype=torch.long),
                "token_type_ids": inputs["token_type_ids"][:, keep]}


@pytest.mark.parametrize("attn", ATTN)
def test_pre_llm_prefill_and_decode_equal_the_stock_model_on_the_shortened_prompt(attn):
    """Pre-LLM, prefill and every decode step past the window: the stock model fed the kept tokens (its own masks
    from the kept token types, its sliding cache holding the last window-1 kept tokens) with original positions."""
    tv = model("gemma3", attn)
    inputs = batch_inputs(tv, [1])
    keep = _uniform_keep(tv, inputs, 0.5)
    short = _shortened(tv, inputs, keep)
    steps = 6
    with vtprune.apply(tv.model, "uniform", keep=0.5):
        out = tv.model.generate(**inputs, **{**GEN, "max_new_tokens": steps})
    hooked = torch.stack(out.logits, 1)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]

    def oracle(with_types: bool) -> torch.Tensor:
        kw = dict(short) if with_types else {k: v for k, v in short.items() if k != "token_type_ids"}
        o = tv.model.model(**kw, use_cache=True)
        logits, cache, n = [tv.model.lm_head(o.last_hidden_state[:, -1])], o.past_key_values, keep.numel()
        for t in range(steps - 1):
            o = tv.model.model(input_ids=new[:, t:t + 1], past_key_values=cache, use_cache=True,
                               position_ids=torch.tensor([[inputs["input_ids"].shape[1] + t]]),
                               attention_mask=torch.ones(1, n + t + 1, dtype=torch.long))
            logits.append(tv.model.lm_head(o.last_hidden_state[:, -1]))
        return torch.stack(logits, 1)

    assert keep.numel() + steps > 2 * tv.model.config.text_config.sliding_window
    torch.testing.assert_close(hooked, oracle(True), atol=1e-5, rtol=1e-5)
    assert _differs(oracle(False), hooked)  # negative control: without the kept tokens' image blocks


def test_decode_needs_the_rebuilt_masks_of_the_pruned_layers():
    """At decode the model sizes its masks on layer 0 and the first full layer (both unpruned / pruned alike):
    without vtprune's rebuilt masks for the pruned layers the in-LLM decode is wrong or fails."""
    tv = model("gemma3")
    inputs = batch_inputs(tv, [0, 1])
    adapter = vtprune.models.family_class("gemma3")
    real = adapter.lm_masks
    with vtprune.apply(tv.model, "uniform", keep=0.5, site="layer", layer=K):
        cached = torch.stack(tv.model.generate(**inputs, **GEN).logits, 1)
        uncached = torch.stack(tv.model.generate(**inputs, **GEN, use_cache=False).logits, 1)
        torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
        # only continuation calls lose the rebuild; the prefill (the one call with image blocks) keeps it
        adapter.lm_masks = lambda self, e, p, cache, f, b=None: real(self, e, p, cache, f, b) if b is not None else None
        try:
            wrong = torch.stack(tv.model.generate(**inputs, **GEN).logits, 1)
        except (RuntimeError, IndexError, vtprune.VTPruneError):
            return
        finally:
            adapter.lm_masks = real
    assert _differs(wrong, uncached)


def _pan_and_scan(tv, samples: list[int], sizes: list[tuple[int, int]]) -> dict:
    prompts = [tv.prompt(["what is this", "how many are there", "describe"][s % 3]) for s in samples]
    images = [[random_image(s, size)] for s, size in zip(samples, sizes)]
    return dict(tv.processor(text=prompts, images=images, return_tensors="pt", padding=True,
                             images_kwargs=PAN_AND_SCAN))


@pytest.mark.parametrize("site", [{"site": "pre_llm"}, {"site": "layer", "layer": K}], ids=["pre_llm", "layer"])
def test_pan_and_scan_views_are_pruned_as_blocks_of_their_own(site):
    """A wide image = the original view + 2 crops, each its own run, block and budget; a ragged batch with a
    one-view image equals each sample alone, cached equals uncached."""
    tv = model("gemma3")
    batch = _pan_and_scan(tv, [0, 1], [(112, 56), (56, 56)])
    assert batch["pixel_values"].shape[0] == 4  # 3 views + 1
    with vtprune.apply(tv.model, "uniform", keep=0.5, **site) as handle:
        out = tv.model.generate(**batch, **GEN)
        assert [len(s.images) for s in handle.stats.samples] == [3, 1]
        assert handle.stats.visual_after == [6, 2]
        uncached = tv.model.generate(**batch, **GEN, use_cache=False)
        torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(uncached.logits, 1), atol=1e-5, rtol=1e-5)
        for row, (s, size) in enumerate([(0, (112, 56)), (1, (56, 56))]):
            alone = tv.model.generate(**_pan_and_scan(tv, [s], [size]), **GEN)
            torch.testing.assert_close(torch.stack(out.logits, 1)[row], torch.stack(alone.logits, 1)[0],
                                       atol=1e-5, rtol=1e-5)


def test_pan_and_scan_pre_llm_equals_the_shortened_prompt_with_one_block_per_view():
    """Each kept view keeps its own bidirectional block; joining the views into one block (negative control)
    changes the result."""
    tv = model("gemma3")
    inputs = _pan_and_scan(tv, [0], [(112, 56)])
    keep = _uniform_keep(tv, inputs, 0.5)
    short = _shortened(tv, inputs, keep)
    reference = tv.model.lm_head(tv.model.model(**short).last_hidden_state)
    with vtprune.apply(tv.model, "uniform", keep=0.5):
        hooked = tv.model(**inputs).logits
    torch.testing.assert_close(hooked, reference, atol=1e-6, rtol=1e-6)
    types = short["token_type_ids"]
    first, last = types[0].nonzero()[[0, -1], 0].tolist()
    joined = types.clone()
    joined[0, first:last + 1] = 1  # one block spanning every view (and the text between them)
    assert _differs(tv.model.lm_head(tv.model.model(**{**short, "token_type_ids": joined}).last_hidden_state),
                    reference)


def test_sliding_layers_decode_flops_count_the_window():
    """Decode FLOPs match FlopCounterMode with sliding layers attending to window-1 cached keys + their own
    (negative control: the full-attention formula over-counts)."""
    tv = model("gemma3")
    inputs = batch_inputs(tv, [1])
    steps = 4
    with vtprune.apply(tv.model, "uniform", keep=0.5) as handle:
        measured = measured_flops(lambda: tv.model.generate(**inputs, **{**GEN, "max_new_tokens": steps}))
        report = flops_from_stats(tv.model, handle.stats, inputs=inputs)
    assert report.decode and report.total == measured
    text = tv.model.config.text_config
    lens = report.layer_seq_lens[0]
    assert lens[-1] > text.sliding_window  # every decode step is past the window
    full = sum(4 * text.num_attention_heads * text.head_dim * (n + t) for t in range(1, steps) for n in lens)
    assert full > sum(step["llm_attention"] for step in report.decode)


def test_a_custom_4d_mask_is_gathered_as_given():
    """A caller's own 4-D mask is what the model applies to every layer (no windows, no blocks): pruning gathers
    it, so pre-LLM equals the stock model on the shortened input with the shortened mask; the rebuilt masks of a
    2-D input (negative control) differ."""
    tv = model("gemma3")
    inputs = batch_inputs(tv, [1])
    keep = _uniform_keep(tv, inputs, 0.5)
    n = inputs["input_ids"].shape[1]
    four = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    short = _shortened(tv, inputs, keep)
    short["attention_mask"] = four[:, :, keep][..., keep]
    reference = tv.model.lm_head(tv.model.model(**short).last_hidden_state)
    with vtprune.apply(tv.model, "uniform", keep=0.5):
        hooked = tv.model(**{**inputs, "attention_mask": four}).logits
        rebuilt = tv.model(**inputs).logits
    torch.testing.assert_close(hooked, reference, atol=1e-6, rtol=1e-6)
    assert _differs(rebuilt, reference)


def test_lmms_eval_cli_runs_the_pruned_gemma3_wrapper(tmp_path):
    """The stock lmms-eval CLI runs ``vtprune_gemma3`` (lmms-eval's simple Gemma3 wrapper with the pruner)."""
    pytest.importorskip("lmms_eval")
    from lmms_sweep import lmms_sweep

    (base, base_res), (pruned, pruned_res) = lmms_sweep(tmp_path, "gemma3", keep=2)
    for record, res, after in ((base, base_res, 4), (pruned, pruned_res, 2)):
        assert record["status"] == "ok", record.get("error")
        assert res["config"]["model"] == "vtprune_gemma3"
        assert res["throughput"]["avg_vtprune_visual_before"] == 4
        assert res["throughput"]["avg_vtprune_visual_after"] == after
    assert pruned["lmms_eval"]["command"].startswith("lmms-eval --model vtprune_gemma3 --model_args pretrained=")