"""merge="proportional": dropped visual tokens merged into kept ones, +log(size) on every attention logit on them.

The identity (n copies of one token sharing one position == one token with bias log n, for queries after the last
copy) is checked through the mask path the engine uses (``vtprune.merge.biased_mask``), then end to end on a
one-layer LLaVA whose copies share a position id (prefill logits and decode steps), each with a negative control.
The engine properties (keep-all, cached == uncached, batch == single, later turns, every family) are checked at
both sites; tests/test_merge_layer.py has the in-LLM site's own identity and hand-built reference.
"""

from __future__ import annotations

import copy
import functools
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import GEN, batch_inputs, model
from test_multiturn import STEP, _conversation, _tokens_only, _turn_one
from transformers.cache_utils import StaticCache

import vtprune
from vtprune.errors import VTPruneError
from vtprune.merge import biased_mask, check_merge_support
from vtprune.ops import merge_dropped
from vtprune.sites.continuation import ledger_of
from vtprune.sites.layer import LayerSite
from vtprune.testing import FAMILIES, tiny_vlm
from vtprune.view import Selection

COPIES = 4  # a power of two: the merged state of identical copies is then bit-exact in float32
SCHEDULE = ((1, 0.5), (2, 0.25), (3, 0.125))
#: where merging runs: before the LLM, in-LLM at one layer, in-LLM at every cut of a schedule
SITES = [pytest.param(dict(keep=0.3), id="pre_llm"), pytest.param(dict(site="layer", layer=2, keep=0.3), id="K=2"),
         pytest.param(dict(site="layer", schedule=SCHEDULE), id="schedule")]


@functools.cache
def one_layer(attn: str):
    """A one-layer tiny LLaVA: the layer-0 identity then holds for every logit after the copies."""
    return tiny_vlm("llava", attn_implementation=attn, num_layers=1)


def _generate(tv, inputs, **kw):
    out = tv.model.generate(**inputs, **{**GEN, **kw})
    return out.sequences, torch.stack(out.logits, 1)


# ---- the identity through the engine's mask path --------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_copies_sharing_a_position_equal_one_token_with_log_n_bias(attn):
    lm = one_layer(attn).model.model.language_model
    attention = lm.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, lm.config.hidden_size, generator=g)
    first = 3
    x[:, first + 1:first + COPIES] = x[:, first:first + 1]  # copies at 3..6
    pos = torch.arange(12)[None]
    pos[:, first:first + COPIES] = first  # one position id: equal post-RoPE keys
    keep = torch.tensor([i for i in range(12) if not first < i < first + COPIES])
    bias = torch.zeros(1, keep.numel())
    bias[0, first] = math.log(COPIES)

    def run(states, positions, key_bias):
        mask = biased_mask(None, key_bias, states.shape[1], states.shape[1], attn, states.dtype)
        return attention(states, lm.rotary_emb(states, positions), mask)[0]

    with torch.no_grad():
        full = run(x, pos, torch.zeros(1, 12))
        merged = run(x[:, keep], pos[:, keep], bias)
        unbiased = run(x[:, keep], pos[:, keep], torch.zeros_like(bias))
    after = keep > first + COPIES - 1  # queries after the last copy
    torch.testing.assert_close(merged[:, after], full[:, keep[after]], atol=1e-6, rtol=1e-5)
    assert (unbiased[:, after] - full[:, keep[after]]).abs().max() > 1e-3  # negative control: no bias
    assert not torch.allclose(merged[:, first], full[:, first], atol=1e-4)  # the first copy's own query: not exact


# ---- end to end: copies sharing a position in a one-layer LLaVA ------------------------------------------------

def _copies_setup(tv, layer: int = 0):
    """Inputs whose image tokens 5..8 are copies of token 5 sharing its position id — equal projected features
    (a projector hook), or with ``layer`` K > 0 equal states at layer K's input (a hook on layer K-1's output,
    prefill only) — and the hints that make ``informed`` drop exactly copies 2..4."""
    inputs = tv.inputs([tv.prompt("how many circles")], [vtprune.testing.random_image(0)])
    ids = inputs["input_ids"][0]
    image = (ids == tv.model.config.image_token_id).nonzero().flatten()
    first = int(image[5])
    pos = torch.arange(ids.numel())[None]
    pos[:, first:first + COPIES] = first
    priority = [1.0] * image.numel()
    for i in range(6, 5 + COPIES):
        priority[i] = 0.0
    start = 5 if layer == 0 else first  # image token 5 among the projected features, or in the sequence

    def make_copies(module, args, out):
        if out.shape[-2] < start + COPIES:  # a decode step
            return out
        out = out.clone()
        out[..., start + 1:start + COPIES, :] = out[..., start:start + 1, :]
        return out

    module = tv.model.model.multi_modal_projector if layer == 0 else tv.model.model.language_model.layers[layer - 1]
    hook = module.register_forward_hook(make_copies)
    dropped = torch.arange(first + 1, first + COPIES)
    return dict(inputs, position_ids=pos), [{"p": priority}], image.numel() - COPIES + 1, dropped, hook


def _decode(tv, inputs, steps: int = 3, drop_bias: bool = False):
    """Prefill logits and ``steps`` greedy decode steps (explicit positions and a conversation-wide mask)."""
    out = tv.model(**inputs, use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    if drop_bias:
        ledger_of(cache).plan.bias = None
    next_pos = int(inputs["position_ids"].max()) + 1
    mask = inputs["attention_mask"]
    for step in range(steps):
        token = logits[-1][:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = tv.model(input_ids=token, attention_mask=mask, past_key_values=cache,
                       position_ids=torch.tensor([[next_pos + step]]), use_cache=True)
        logits.append(out.logits)
    return logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_end_to_end_copies_merged_equal_the_copies(attn):
    tv = one_layer(attn)
    inputs, hints, k, dropped, hook = _copies_setup(tv)
    try:
        with torch.no_grad():
            ref = _decode(tv, inputs)
            runs = {}
            for merge in ("proportional", "none"):
                with vtprune.apply(tv.model, "informed", keep=k, key="p", merge=merge) as handle:
                    handle.set_hints(hints)
                    runs[merge] = _decode(tv, inputs)
                    if merge == "proportional":
                        handle.set_hints(hints)
                        runs["bias dropped"] = _decode(tv, inputs, drop_bias=True)
    finally:
        hook.remove()
    kept = torch.tensor([i for i in range(inputs["input_ids"].shape[1]) if i not in dropped.tolist()])
    after = kept > dropped[-1]
    merged = runs["proportional"]
    torch.testing.assert_close(merged[0][:, after], ref[0][:, kept[after]], atol=1e-5, rtol=1e-5)
    for step in range(1, len(ref)):
        torch.testing.assert_close(merged[step], ref[step], atol=1e-5, rtol=1e-5)
    # negative controls: dropping the copies without merging changes the prefill; dropping the ledger's bias
    # after the prefill changes every decode step
    assert (runs["none"][0][:, after] - ref[0][:, kept[after]]).abs().max() > 1e-4
    assert all((runs["bias dropped"][s] - ref[s]).abs().max() > 1e-4 for s in range(1, len(ref)))


# ---- engine properties of a merged run ------------------------------------------------------------------------

@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family,attn", [("llava", "sdpa"), ("qwen2_vl", "eager")])
def test_merged_run_cached_uncached_batch_single(family, attn, site):
    tv = model(family, attn)
    samples = [0, 1]
    with vtprune.apply(tv.model, "random", merge="proportional", **site):
        seq_b, step_b = _generate(tv, batch_inputs(tv, samples))
        seq_u, step_u = _generate(tv, batch_inputs(tv, samples), use_cache=False)
        singles = [_generate(tv, batch_inputs(tv, [s])) for s in samples]
    with vtprune.apply(tv.model, "random", **site):
        _, step_plain = _generate(tv, batch_inputs(tv, samples))
    assert torch.equal(seq_b, seq_u)
    torch.testing.assert_close(step_b, step_u, atol=1e-5, rtol=1e-5)
    n_new = GEN["max_new_tokens"]
    for row, (seq_s, step_s) in enumerate(singles):
        assert torch.equal(seq_b[row, -n_new:], seq_s[0, -n_new:])
        torch.testing.assert_close(step_b[row], step_s[0], atol=1e-5, rtol=1e-5)
    assert (step_b - step_plain).abs().max() > 1e-3  # merging changed something


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("second_image", [False, True], ids=["text-turn", "image-turn"])
def test_merged_conversation_continues_like_one_pass(second_image, site):
    """A later turn on a merged cache (text only, or a new image merged with its own sizes) == the whole
    conversation in one pass: the ledger's bias (each layer group's, in-LLM) covers the old slots, the new plan's
    the new ones."""
    tv = model("llava")
    with vtprune.apply(tv.model, "random", merge="proportional", **site):
        first, out = _turn_one(tv, {}, batch=1 if second_image else 2)
        ledger = ledger_of(out.past_key_values)
        assert all(ledger.group(i).bias is not None for i in range(1 + len(ledger.later)))
        whole, extra = _conversation(tv, first, out.sequences, second_image=second_image)
        cont = tv.model.generate(**_tokens_only(whole), **extra, past_key_values=copy.deepcopy(out.past_key_values),
                                 max_new_tokens=3, **STEP)
        fresh = tv.model.generate(**whole, max_new_tokens=3, **STEP)
    assert torch.equal(cont.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(cont.logits, 1), torch.stack(fresh.logits, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("site", SITES[:2])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_merges_cached_equal_uncached_or_refuses(family, site):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    if family in ("qwen3_5", "gemma3"):  # linear-attention / sliding-window layers take no shared key bias
        with pytest.raises(VTPruneError, match="merge='proportional' is not supported on"):
            vtprune.apply(tv.model, "random", merge="proportional", **site)
        return
    with vtprune.apply(tv.model, "random", merge="proportional", **site):
        seq_c, step_c = _generate(tv, inputs)
        seq_u, step_u = _generate(tv, inputs, use_cache=False)
    assert torch.equal(seq_c, seq_u)
    torch.testing.assert_close(step_c, step_u, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("merge", ["none", "proportional"])
def test_unpadded_row_generates_the_same_uncached(merge):
    """One row without padding: uncached generation passes positions but no mask, and transformers must not read
    the kept tokens' position gaps as packed sequences (the site passes a 2-D mask; this failed before)."""
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    assert bool(inputs["attention_mask"].all())
    with vtprune.apply(tv.model, "random", keep=0.25, merge=merge):
        seq_c, step_c = _generate(tv, inputs)
        seq_u, step_u = _generate(tv, inputs, use_cache=False)
    assert torch.equal(seq_c, seq_u)
    torch.testing.assert_close(step_c, step_u, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_merge_with_nothing_dropped_is_the_unpruned_model(family):
    """No pruner runs (keep=1.0) / the pruner runs and drops nothing (all sizes 1: no bias), at both sites and at
    every cut of a schedule: bit-identical to the unhooked model."""
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    ref = _generate(tv, inputs)
    for options in (dict(keep=1.0), dict(keep=10_000), dict(site="layer", layer=2, keep=1.0),
                    dict(site="layer", layer=2, keep=10_000), dict(site="layer", schedule=((1, 10_002), (2, 10_001),
                                                                                          (3, 10_000)))):
        with vtprune.apply(tv.model, "random", merge="proportional", **options):
            seq, step = _generate(tv, inputs)
        assert torch.equal(seq, ref[0]) and torch.equal(step, ref[1]), options


def test_visionzip_contextual_tokens_carry_their_group_sizes():
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, "visionzip", keep=8, contextual=0.5, merge="proportional") as handle:
        plans = []
        select = handle._engine.select
        handle._engine.select = lambda *a: plans.append(select(*a)) or plans[-1]
        tv.model(**inputs)
        before = handle.stats.visual_before
    sizes = plans[0].bias.exp()
    assert sizes.max() > 1  # the contextual tokens stand for their groups
    assert math.isclose(float(sizes.sum() - (plans[0].length - 8)), before[0], rel_tol=1e-6)  # every token, once


def test_merge_dropped_is_a_size_weighted_mean_into_the_most_similar_kept_token():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0], [4.0, 0.0]])
    out = merge_dropped(features, Selection(indices=torch.tensor([0, 1])))
    torch.testing.assert_close(out.sizes, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(out.embeddings, torch.stack([features[[0, 2, 4]].mean(0), features[[1, 3]].mean(0)]))
    own = Selection(indices=torch.tensor([0, 1]), sizes=torch.tensor([2.0, 3.0]))
    assert merge_dropped(features, own) is own  # a pruner that merged itself is taken as it is


# ---- refusals --------------------------------------------------------------------------------------------------

def test_refusals(monkeypatch):
    with pytest.raises(VTPruneError, match="merge='bogus'"):
        vtprune.RandomConfig(merge="bogus")
    monkeypatch.setattr(LayerSite, "supports_merge", False)  # a site whose masks carry no key bias
    with pytest.raises(VTPruneError, match="not supported at site='layer'"):
        vtprune.RandomConfig(site="layer", layer=2, merge="proportional")
    monkeypatch.undo()
    full = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention"]))
    with pytest.raises(VTPruneError, match="flash_attention_2"):
        check_merge_support(SimpleNamespace(attn_implementation="flash_attention_2", language_model=full))
    hybrid = SimpleNamespace(config=SimpleNamespace(layer_types=["linear_attention", "full_attention"]))
    with pytest.raises(VTPruneError, match="linear_attention"):
        check_merge_support(SimpleNamespace(attn_implementation="sdpa", language_model=hybrid))
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, "random", keep=0.5, merge="proportional"):
        cache = StaticCache(config=tv.model.config.get_text_config(), max_cache_len=64)
        with pytest.raises(VTPruneError, match="static cache"):
            tv.model(**inputs, past_key_values=cache)
