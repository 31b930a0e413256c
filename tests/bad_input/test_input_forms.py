"""Every input form transformers accepts (reliability issue, items 12-14): static and sliding-window
caches, padding-free packed rows, 4-D masks, ``inputs_embeds`` and ``labels``.

Keep-all hooks are invisible (bit-identical to the unhooked model); pruning equals the dynamic-cache run
or the hand-shortened input; what cannot be pruned exactly is refused by name.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from conftest import ATTN, SITES, batch_inputs, model
from test_core_reference import _capture, _full_positions, _kept_types, _lm_logits, _uniform_keep
from vtprune.testing import FAMILIES, shortened_lm_inputs

CASES = [(f, a, s) for f in FAMILIES for a in ATTN for s in SITES]
IDS = [f"{f}-{a}-{s['site']}" for f, a, s in CASES]
GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _generate(tv, inputs, **kw):
    out = tv.model.generate(**inputs, **{**GEN, **kw})
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("cache", ["static", "sliding_window"])
@pytest.mark.parametrize("family,attn,site", CASES, ids=IDS)
def test_static_caches(family, attn, site, cache):
    """Item 12: keep-all on a static cache == unhooked static, bit for bit; pruned static == pruned dynamic."""
    tv = model(family, attn)
    inputs = batch_inputs(tv, [0, 1])
    ref_seq, ref_step = _generate(tv, inputs, cache_implementation=cache)
    with vtprune.apply(tv.model, "random", keep=1.0, **site):
        seq, step = _generate(tv, inputs, cache_implementation=cache)
    assert torch.equal(seq, ref_seq) and torch.equal(step, ref_step)
    with vtprune.apply(tv.model, "random", keep=0.3, **site) as handle:
        seq_s, step_s = _generate(tv, inputs, cache_implementation=cache)
        assert handle.stats.visual_after != handle.stats.visual_before
        seq_d, step_d = _generate(tv, inputs)
    assert torch.equal(seq_s, seq_d)
    torch.testing.assert_close(step_s, step_d, atol=1e-5, rtol=1e-5)


def _packed(tv) -> dict:
    """Two single-image prompts packed into one row without padding: no mask, position ids restarting at
    the second prompt (Qwen: a text row above the M-RoPE rows, as transformers expects for packing)."""
    parts = [batch_inputs(tv, [i]) for i in (0, 3)]  # same image size, different pixels
    out = {"input_ids": torch.cat([p["input_ids"] for p in parts], 1)}
    for key in ("pixel_values", "image_grid_thw", "image_sizes"):
        if key in parts[0]:
            out[key] = torch.cat([p[key] for p in parts])
    if tv.family.startswith("qwen"):
        out["mm_token_type_ids"] = torch.cat([p["mm_token_type_ids"] for p in parts], 1)
        rope = [tv.model.model.get_rope_index(p["input_ids"], image_grid_thw=p["image_grid_thw"],
                                              attention_mask=p["attention_mask"],
                                              mm_token_type_ids=p["mm_token_type_ids"])[0] for p in parts]
        text = [torch.arange(p["input_ids"].shape[1]).view(1, 1, -1) for p in parts]
        out["position_ids"] = torch.cat([torch.cat([t, r]) for t, r in zip(text, rope)], -1)
    else:
        out["position_ids"] = torch.cat([torch.arange(p["input_ids"].shape[1]) for p in parts])[None]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_inputs_keep_all_and_refusal(family):
    """Item 13: packed rows pass through keep-all untouched (the engine used to substitute a mask, so the
    sequences attended across their boundary); pruning them is refused by name."""
    tv = model(family)
    packed = _packed(tv)
    ref = tv.model(**packed).logits
    with vtprune.apply(tv.model, "random", keep=1.0):
        assert torch.equal(tv.model(**packed).logits, ref)
        _, lm_kw = _capture(tv.model.model.language_model, lambda: tv.model(**packed))
        if family != "gemma3":  # its backbone builds per-layer masks, reading the packing from the positions
            assert lm_kw.get("attention_mask") is None  # packing is read from positions only when there is no mask
    with vtprune.apply(tv.model, "random", keep=0.3):
        with pytest.raises(vtprune.VTPruneError, match="packed"):
            tv.model(**packed)


def _mask_4d(mask_2d: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The standard causal + padding mask as a custom 4-D mask."""
    n = mask_2d.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & mask_2d.bool()[:, None, None, :]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize("family,attn,site", CASES, ids=IDS)
def test_4d_masks(family, attn, site):
    """Item 13: a custom 4-D mask passes keep-all untouched (with or without images), and pruning with it
    equals pruning with the 2-D mask it spells out."""
    tv = model(family, attn)
    kind = "additive" if attn == "eager" else "bool"
    text_only = dict(tv.processor(text=["just some words here"], return_tensors="pt"))
    text_only["attention_mask"] = _mask_4d(text_only["attention_mask"], kind, torch.float32)
    inputs = batch_inputs(tv, [1])
    if family.startswith("qwen"):  # its M-RoPE index reads a 2-D mask: pass the positions, as unhooked
        inputs["position_ids"] = tv.model.model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"])[0]
    four = {**inputs, "attention_mask": _mask_4d(inputs["attention_mask"], kind, torch.float32)}
    ref_text = tv.model(**text_only).logits
    ref = tv.model(**four).logits
    with vtprune.apply(tv.model, "random", keep=1.0, **site):
        assert torch.equal(tv.model(**text_only).logits, ref_text)
        assert torch.equal(tv.model(**four).logits, ref)
    if family == "gemma3":  # a 4-D mask replaces its windows and image blocks: tests/test_family_gemma3.py
        return
    with vtprune.apply(tv.model, "random", keep=0.3, **site):
        torch.testing.assert_close(tv.model(**four).logits, tv.model(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_embeds_keep_all(family):
    """Keep-all hooks are invisible to a prefill given as ``inputs_embeds`` (images found by embedding)."""
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    embeds = tv.model.get_input_embeddings()(inputs.pop("input_ids"))
    ref = tv.model(inputs_embeds=embeds, **inputs).logits
    with vtprune.apply(tv.model, "random", keep=1.0):
        assert torch.equal(tv.model(inputs_embeds=embeds, **inputs).logits, ref)


@pytest.mark.parametrize("family,attn,site", CASES, ids=IDS)
def test_labels_keep_all(family, attn, site):
    """Item 14: keep-all leaves the loss bit-identical."""
    tv = model(family, attn)
    inputs = batch_inputs(tv, [0, 1])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    ref = tv.model(**inputs, labels=labels).loss
    with vtprune.apply(tv.model, "random", keep=1.0, **site):
        assert torch.equal(tv.model(**inputs, labels=labels).loss, ref)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_follow_the_pruned_sequence(family, attn):
    """Item 14: the loss under pruning equals the unhooked model's loss on the hand-shortened input with the
    kept tokens' labels; a batch with padding runs, and gradients flow."""
    tv = model(family, attn)
    inputs = batch_inputs(tv, [1])
    labels = inputs["input_ids"].clone()
    _, lm_kw = _capture(tv.model.model.language_model, lambda: tv.model(**inputs))
    embeds = lm_kw["inputs_embeds"]
    keep = _uniform_keep(tv, inputs, 0.4)
    pos = _full_positions(tv, lm_kw, embeds.shape[1])
    logits = _lm_logits(tv, embeds[:, keep], pos[..., keep], torch.ones(1, keep.numel(), dtype=torch.long),
                        _kept_types(inputs, keep), shortened_lm_inputs(lm_kw, keep))
    kept_labels = labels[:, keep]
    expected = torch.nn.functional.cross_entropy(logits[0, :-1].float(), kept_labels[0, 1:])
    full_loss = tv.model(**inputs, labels=labels).loss
    with vtprune.apply(tv.model, "uniform", keep=0.4):
        got = tv.model(**inputs, labels=labels).loss
        batch = batch_inputs(tv, [0, 1])
        loss = tv.model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
    tv.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - full_loss).abs() > 1e-4  # negative control: the unpruned loss differs
    assert labels.shape == inputs["input_ids"].shape  # the caller's labels are not touched


def test_compiled_decoding_is_refused_or_made_eager():
    """Item 12: torch.compile does not retrace hooks installed after compilation, so generate decodes eagerly
    under vtprune (with a warning for static caches) and refuses an explicit ``disable_compile=False``."""
    from transformers import CompileConfig

    tv = model("llava")
    inputs = batch_inputs(tv, [0, 1])
    everywhere = CompileConfig()
    everywhere._compile_all_devices = True  # what would let generate compile on this CPU
    with vtprune.apply(tv.model, "random", keep=0.3):
        eager = _generate(tv, inputs, cache_implementation="static", disable_compile=True)
        with pytest.warns(UserWarning, match="decodes eagerly"):
            got = _generate(tv, inputs, cache_implementation="static", compile_config=everywhere)
        with pytest.raises(vtprune.VTPruneError, match="disable_compile"):
            _generate(tv, inputs, cache_implementation="static", disable_compile=False)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("site", SITES, ids=lambda s: s["site"])
def test_gradient_checkpointing_with_pruning(family, site):
    """Item 14: training-style forwards with gradient checkpointing (layers re-run in backward, hooks and
    all) give the loss and gradients of the plain forward."""
    from vtprune.testing import tiny_vlm

    tv = tiny_vlm(family)  # a private model: checkpointing and train mode must not leak into shared ones
    inputs = batch_inputs(tv, [0, 1])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    tv.model.train()
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            tv.model.activation_checkpointing_enable()
        tv.model.zero_grad(set_to_none=True)
        with vtprune.apply(tv.model, "random", keep=0.3, **site):
            loss = tv.model(**inputs, labels=labels, use_cache=False).loss
            loss.backward()
        results.append((loss.detach(), tv.model.lm_head.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-6)
