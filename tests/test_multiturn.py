"""Multi-turn conversations on a pruned KV cache (reliability issue, item 1) and selection reuse (item 8).

The reference for every continuation is the whole conversation run in one pass, hooked, with the same
selections: the ``random`` pruner draws one subset per (seed, token count), so an image gets the same
tokens whether it is pruned in the first prefill, in a later turn, or in a one-pass run.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vtprune
from conftest import ATTN, SITES, model
from vtprune.sites.continuation import ledger_of
from vtprune.testing import FAMILIES, random_image

CASES = [(f, a, s) for f in FAMILIES for a in ATTN for s in SITES]
IDS = [f"{f}-{a}-{s['site']}" for f, a, s in CASES]
PIXELS = ("pixel_values", "image_grid_thw", "image_sizes")
STEP = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


def _image(family: str, i: int):
    return random_image(10 + i, (56, 56) if family == "llava" else [(112, 112), (56, 112)][i % 2])


def _first_turn(tv, batch: int) -> dict:
    """A left-padded batch of first turns, one image each."""
    prompts = [tv.prompt(q) for q in ["what is this", "how many are there"][:batch]]
    return dict(tv.processor(text=prompts, images=[[_image(tv.family, 0)]] * batch, return_tensors="pt",
                             padding=True))


def _conversation(tv, first: dict, sequences: torch.Tensor, second_image: bool) -> tuple[dict, dict]:
    """(the whole conversation with every image, the extra inputs that only the new turn brings)."""
    b = sequences.shape[0]
    turn = tv.prompt("and what colour is it", int(second_image))
    new = dict(tv.processor(text=[turn] * b, images=[[_image(tv.family, 1)]] * b if second_image else None,
                            return_tensors="pt"))
    ids = torch.cat([sequences, new["input_ids"]], 1)
    generated = sequences.shape[1] - first["input_ids"].shape[1]
    mask = torch.cat([first["attention_mask"], torch.ones(b, ids.shape[1] - first["attention_mask"].shape[1],
                                                          dtype=torch.long)], 1)
    whole = {"input_ids": ids, "attention_mask": mask}
    for key in ("mm_token_type_ids", "token_type_ids"):  # Qwen's M-RoPE index; Gemma 3's image blocks
        if key in first:
            whole[key] = torch.cat([first[key], torch.zeros(b, generated, dtype=torch.long), new[key]], 1)
    for key in PIXELS:
        if key in first:
            whole[key] = first[key] if not second_image else _cat_pixels(first[key], new[key])
    extra = {k: new[k] for k in PIXELS if k in new}
    return whole, extra


def _uncached(whole: dict, out) -> int:
    """Tokens of the conversation the first turn's cache does not hold: the new turn and the last token
    ``generate`` produced (it is returned, never fed)."""
    return whole["input_ids"].shape[1] - out.sequences.shape[1] + 1


def _tokens_only(whole: dict) -> dict:
    """The per-token inputs of a conversation (images already in the cache are not passed again)."""
    return {k: v for k, v in whole.items() if k not in PIXELS}


def _cat_pixels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate per-image pixel tensors (LLaVA-NeXT pads each image's crops to the batch's most)."""
    if a.dim() == 5 and a.shape[1] != b.shape[1]:
        n = max(a.shape[1], b.shape[1])
        a, b = (torch.cat([x, x.new_zeros(x.shape[0], n - x.shape[1], *x.shape[2:])], 1) for x in (a, b))
    return torch.cat([a, b])


def _turn_one(tv, site: dict, batch: int = 2):
    first = _first_turn(tv, batch)
    out = tv.model.generate(**first, max_new_tokens=3, **STEP)
    return first, out


@pytest.mark.parametrize("family,attn,site", CASES, ids=IDS)
def test_generate_continues_a_pruned_cache(family, attn, site):
    """``generate(whole conversation, past_key_values=cache)`` == one pass over the whole conversation."""
    tv = model(family, attn)
    with vtprune.apply(tv.model, "random", keep=0.3, **site) as handle:
        first, out = _turn_one(tv, site)
        assert handle.stats.visual_after != handle.stats.visual_before
        whole, _ = _conversation(tv, first, out.sequences, second_image=False)
        cont = tv.model.generate(**_tokens_only(whole), past_key_values=copy.deepcopy(out.past_key_values),
                                 max_new_tokens=3, **STEP)
        fresh = tv.model.generate(**whole, max_new_tokens=3, **STEP)
    assert torch.equal(cont.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(cont.logits, 1), torch.stack(fresh.logits, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,attn,site", CASES, ids=IDS)
def test_manual_forward_continues_a_pruned_cache(family, attn, site):
    """A forward of only the new tokens (mask over the whole conversation, no positions) == one pass; the
    ledger on the cache is what makes it so (negative control: the same call without it differs)."""
    tv = model(family, attn)
    with vtprune.apply(tv.model, "random", keep=0.3, **site):
        first, out = _turn_one(tv, site)
        whole, _ = _conversation(tv, first, out.sequences, second_image=False)
        n_new = _uncached(whole, out)
        ref = tv.model(**whole).logits[:, -n_new:]
        new_ids = whole["input_ids"][:, -n_new:]
        cache = copy.deepcopy(out.past_key_values)
        got = tv.model(input_ids=new_ids, attention_mask=whole["attention_mask"], past_key_values=cache).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        bare = copy.deepcopy(out.past_key_values)
        del bare._vtprune_ledger
        try:  # without the ledger the call is wrong, or transformers itself fails on the mismatched lengths
            wrong = tv.model(input_ids=new_ids, attention_mask=whole["attention_mask"], past_key_values=bare).logits
        except (RuntimeError, ValueError, vtprune.VTPruneError):
            return
    assert (wrong - ref).abs().max() > 1e-3


def _qwen_positions(tv, whole: dict, n_new: int) -> torch.Tensor:
    """M-RoPE positions of the last ``n_new`` tokens, from the model's own get_rope_index on the whole turn."""
    pos, _ = tv.model.model.get_rope_index(whole["input_ids"], image_grid_thw=whole["image_grid_thw"],
                                           attention_mask=whole["attention_mask"],
                                           mm_token_type_ids=whole["mm_token_type_ids"])
    return pos[..., -n_new:]


@pytest.mark.parametrize("family,attn,site", CASES, ids=IDS)
def test_second_image_in_a_later_turn(family, attn, site):
    """A later turn brings a new image, pruned with its own budget: == one pass over both images. LLaVA
    families through ``generate``; Qwen's ``generate`` cannot take a later image even unhooked (its M-RoPE
    index needs every image's grid while the forward takes only the new pixels), so a manual forward with
    the positions of the whole conversation, as without vtprune."""
    tv = model(family, attn)
    with vtprune.apply(tv.model, "random", keep=0.3, **site) as handle:
        first, out = _turn_one(tv, site, batch=1)
        whole, extra = _conversation(tv, first, out.sequences, second_image=True)
        ref_step = tv.model(**whole).logits
        assert len(handle.stats.samples[0].images) == 2
        cache = copy.deepcopy(out.past_key_values)
        n_new = _uncached(whole, out)
        if family.startswith("qwen"):
            got = tv.model(input_ids=whole["input_ids"][:, -n_new:], attention_mask=whole["attention_mask"],
                           past_key_values=cache, position_ids=_qwen_positions(tv, whole, n_new),
                           mm_token_type_ids=whole["mm_token_type_ids"][:, -n_new:], **extra).logits
            (before, after), = handle.stats.samples[0].images  # the later image alone, with its own budget
            torch.testing.assert_close(got[:, -1], ref_step[:, -1], atol=1e-5, rtol=1e-5)
        else:
            cont = tv.model.generate(**_tokens_only(whole), **extra, past_key_values=cache, max_new_tokens=3, **STEP)
            (before, after), = handle.stats.samples[0].images
            fresh = tv.model.generate(**whole, max_new_tokens=3, **STEP)
            assert torch.equal(cont.sequences, fresh.sequences)
            torch.testing.assert_close(torch.stack(cont.logits, 1), torch.stack(fresh.logits, 1), atol=1e-5,
                                       rtol=1e-5)
        assert after == max(1, int(0.3 * before + 0.5)) < before


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_qwen_later_image_without_positions_is_refused(family):
    """Without positions the M-RoPE ids of a later image cannot be derived from the new tokens alone."""
    tv = model(family)
    with vtprune.apply(tv.model, "random", keep=0.3):
        first, out = _turn_one(tv, SITES[0], batch=1)
        whole, extra = _conversation(tv, first, out.sequences, second_image=True)
        n_new = _uncached(whole, out)
        call = dict(input_ids=whole["input_ids"][:, -n_new:], attention_mask=whole["attention_mask"],
                    past_key_values=copy.deepcopy(out.past_key_values), **extra)
        if family == "qwen2_vl":
            call["mm_token_type_ids"] = whole["mm_token_type_ids"][:, -n_new:]
            with pytest.raises(vtprune.VTPruneError, match="position_ids"):
                tv.model(**call)
        else:  # 1-D positions continue from the ledger
            got = tv.model(**call).logits[:, -1]
            torch.testing.assert_close(got, tv.model(**whole).logits[:, -1], atol=1e-5, rtol=1e-5)


def test_same_input_same_logits_whatever_ran_before():
    """Item 8: FastV reads the last prompt token; a prompt's logits must not depend on whether a prefix of it
    ran first (selections are reused only inside one generate call)."""
    tv = model("llava")
    full = _first_turn(tv, 1)
    cut = full["input_ids"].shape[1] - 3
    prefix = {k: (v[:, :cut] if k in ("input_ids", "attention_mask") else v) for k, v in full.items()}
    with vtprune.apply(tv.model, "fastv", keep=0.3, site="layer", layer=2):
        fresh = tv.model(**full).logits
        tv.model(**prefix)
        after_prefix = tv.model(**full).logits
    assert torch.equal(fresh, after_prefix)


def test_new_hints_invalidate_and_reset_exists():
    """Item 8: ``informed`` follows the hints of each call, and ``handle.reset()`` is part of the API."""
    tv = model("llava")
    inputs = _first_turn(tv, 1)
    n = int((inputs["input_ids"] == tv.model.config.image_token_id).sum())
    first = torch.arange(n, dtype=torch.float)
    with vtprune.apply(tv.model, "informed", keep=4, key="p") as handle:
        handle.set_hints([{"p": first.tolist()}])
        a = tv.model(**inputs).logits
        handle.set_hints([{"p": first.flip(0).tolist()}])
        b = tv.model(**inputs).logits
        handle.reset()
        handle.set_hints([{"p": first.tolist()}])
        c = tv.model(**inputs).logits
    assert (a - b).abs().max() > 1e-4 and torch.equal(a, c)


def test_ledger_travels_with_the_cache():
    """Two conversations interleaved on one handle: each cache continues with its own ledger."""
    tv = model("llava")
    with vtprune.apply(tv.model, "random", keep=0.3):
        first_a, out_a = _turn_one(tv, SITES[0], batch=1)
        first_b = dict(tv.processor(text=[tv.prompt("a different question here")],
                                    images=[[_image("llava", 1)]], return_tensors="pt"))
        out_b = tv.model.generate(**first_b, max_new_tokens=2, **STEP)
        assert ledger_of(out_a.past_key_values) is not ledger_of(out_b.past_key_values)
        whole, _ = _conversation(tv, first_a, out_a.sequences, second_image=False)
        cont = tv.model.generate(**_tokens_only(whole), past_key_values=out_a.past_key_values, max_new_tokens=2,
                                 **STEP)
        fresh = tv.model.generate(**whole, max_new_tokens=2, **STEP)
    assert torch.equal(cont.sequences, fresh.sequences)


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_positions_continue(family):
    """The compact policy renumbers kept tokens; later turns continue from the compact numbering."""
    tv = model(family)
    with vtprune.apply(tv.model, "uniform", keep=0.3, positions="compact"):
        first, out = _turn_one(tv, SITES[0])
        whole, _ = _conversation(tv, first, out.sequences, second_image=False)
        cont = tv.model.generate(**_tokens_only(whole), past_key_values=out.past_key_values, max_new_tokens=3,
                                 **STEP)
        fresh = tv.model.generate(**whole, max_new_tokens=3, **STEP)
    assert torch.equal(cont.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(cont.logits, 1), torch.stack(fresh.logits, 1), atol=1e-5, rtol=1e-5)
