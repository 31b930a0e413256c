"""merge="proportional" at the in-LLM site: tokens dropped at layer K merged into kept ones, +log(size) on every
attention logit on them in layers >= K (layers < K untouched), sizes composing across the cuts of a schedule.

The n-copies identity end to end (copies made identical at layer K's input and sharing one position id, so the
only layer >= K sees n equal keys: prefill and decode, with negative controls); the pruned and merged prefill ==
the stock decoder layers run by hand on the merged sequence with a hand-built bias mask. Keep-all, cached ==
uncached, batch == single, later turns and every family at both sites: tests/test_merge.py.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import batch_inputs, model
from test_core_reference import _capture
from test_merge import COPIES, SITES, _copies_setup, _decode
from test_multistage import _plans
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache, StaticCache

import vtprune
import vtprune.sites.layer as layer_site
from vtprune.errors import VTPruneError
from vtprune.merge import biased_mask
from vtprune.ops import merge_dropped
from vtprune.sites.layer import LayerSite
from vtprune.testing import tiny_vlm
from vtprune.view import Selection

IN_LLM = SITES[1:]


@functools.cache
def two_layer(attn: str):
    """A two-layer tiny LLaVA cut at K=1: layer 1 is the only layer >= K, so the identity holds for its outputs."""
    return tiny_vlm("llava", attn_implementation=attn, num_layers=2)


# ---- the identity end to end: copies identical at layer K, sharing a position ---------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_end_to_end_copies_merged_at_layer_k_equal_the_copies(attn, monkeypatch):
    """Prefill logits after the last copy and every decode step == the unpruned model's. Negative controls: dropping
    the copies without merging changes the prefill; the bias left out of the masks changes it and every decode step;
    the ledger's bias dropped after the prefill changes every decode step."""
    tv = two_layer(attn)
    inputs, hints, k, dropped, hook = _copies_setup(tv, layer=1)
    runs = {}
    try:
        with torch.no_grad():
            ref = _decode(tv, inputs)
            for merge in ("proportional", "none"):
                with vtprune.apply(tv.model, "informed", keep=k, key="p", site="layer", layer=1,
                                   merge=merge) as handle:
                    handle.set_hints(hints)
                    runs[merge] = _decode(tv, inputs)
                    if merge == "proportional":
                        handle.set_hints(hints)
                        runs["ledger bias dropped"] = _decode(tv, inputs, drop_bias=True)
                        with monkeypatch.context() as patch:
                            patch.setattr(layer_site, "biased_mask",
                                          lambda mask, bias, *a: biased_mask(mask, torch.zeros_like(bias), *a))
                            handle.set_hints(hints)
                            runs["no bias"] = _decode(tv, inputs)
    finally:
        hook.remove()
    kept = torch.tensor([i for i in range(inputs["input_ids"].shape[1]) if i not in dropped.tolist()])
    after = kept > dropped[-1]
    merged = runs["proportional"]
    assert merged[0].shape[1] == kept.numel()
    torch.testing.assert_close(merged[0][:, after], ref[0][:, kept[after]], atol=1e-5, rtol=1e-5)
    for step in range(1, len(ref)):
        torch.testing.assert_close(merged[step], ref[step], atol=1e-5, rtol=1e-5)
    for name in ("none", "no bias"):
        assert (runs[name][0][:, after] - ref[0][:, kept[after]]).abs().max() > 1e-4, name
    for name in ("no bias", "ledger bias dropped"):
        assert all((runs[name][s] - ref[s]).abs().max() > 1e-4 for s in range(1, len(ref))), name


def test_decode_mask_path_copies_equal_one_token_with_log_n_bias():
    """The identity through ``biased_mask`` for decode-shaped calls (the last queries of a longer key list, as a layer
    >= K sees them on the cache): n equal keys == one key with bias log n for every query after them."""
    lm = two_layer("sdpa").model.model.language_model
    attention = lm.layers[1].self_attn
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 14, lm.config.hidden_size, generator=g)
    first, q = 4, 3
    x[:, first + 1:first + COPIES] = x[:, first:first + 1]
    pos = torch.arange(14)[None]
    pos[:, first:first + COPIES] = first
    keep = torch.tensor([i for i in range(14) if not first < i < first + COPIES])
    bias = torch.zeros(1, keep.numel() - q)  # the cached slots only: the call's own tokens get none
    bias[0, first] = math.log(COPIES)

    def run(states, positions, key_bias):
        """Cache all but the last q tokens (causal), then attend from the last q with the biased mask."""
        cache = DynamicCache(config=lm.config)
        pe = lm.rotary_emb(states, positions)
        head = [t[:, :-q] for t in pe]
        attention(states[:, :-q], head, biased_mask(None, torch.zeros(1, 0), states.shape[1] - q,
                                                    states.shape[1] - q, "sdpa", states.dtype), past_key_values=cache)
        tail = [t[:, -q:] for t in pe]
        mask = biased_mask(None, key_bias, q, states.shape[1], "sdpa", states.dtype)
        return attention(states[:, -q:], tail, mask, past_key_values=cache)[0]

    with torch.no_grad():
        full = run(x, pos, torch.zeros(1, 14 - q))
        merged = run(x[:, keep], pos[:, keep], bias)
        unbiased = run(x[:, keep], pos[:, keep], torch.zeros_like(bias))
    torch.testing.assert_close(merged, full, atol=1e-6, rtol=1e-5)
    assert (unbiased - full).abs().max() > 1e-3  # negative control


# ---- the prefill == stock layers on the merged sequence, by hand ------------------------------------------------

def _merge_by_hand(h: torch.Tensor, sizes: torch.Tensor, image: torch.Tensor, kept: torch.Tensor):
    """One row's states h [L, D] and sizes [L]: each token of ``image`` (sequence indices) not in ``kept`` added to
    its most cosine-similar kept image token (first on ties), size-weighted; returns the kept tokens' (states,
    sizes)."""
    h, sizes = h.clone().float(), sizes.clone()
    stay, gone = image[torch.isin(image, kept)], image[~torch.isin(image, kept)]
    unit = F.normalize(h, dim=-1)
    sums, totals = h[stay] * sizes[stay, None], sizes[stay].clone()
    for j in gone.tolist():
        t = int((unit[j] @ unit[stay].T).argmax())
        sums[t] += h[j] * sizes[j]
        totals[t] += sizes[j]
    h[stay], sizes[stay] = sums / totals[:, None], totals
    return h[kept], sizes[kept]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("site", IN_LLM)
def test_prefill_matches_stock_layers_on_the_merged_sequence(family, attn, site):
    """Hooked prefill logits == the unhooked decoder layers run by hand from layer K's input: at each cut the
    dropped image tokens merged by hand into their most similar kept one (sizes carried from earlier cuts), then the
    group's layers on the survivors' original positions with an additive causal mask + log(size) per key column.
    Also: every cut's sizes add up to the image's token count. Negative control: the same without the bias."""
    tv = model(family, attn)
    inputs = batch_inputs(tv, [1])
    lm = tv.model.model.language_model
    cuts = site.get("schedule") or ((site["layer"], site["keep"]),)
    _, lm_kw = _capture(lm, lambda: tv.model(**inputs))
    (hidden,), _ = _capture(lm.layers[cuts[0][0]], lambda: tv.model(**inputs))
    pos = lm_kw.get("position_ids")
    pos = torch.arange(hidden.shape[1]).view(1, 1, -1) if pos is None else (pos[None] if pos.dim() == 2 else pos)
    image = (inputs["input_ids"][0] == tv.model.config.image_token_id).nonzero().flatten()
    with vtprune.apply(tv.model, "random", merge="proportional", **site) as handle:
        plans = _plans(handle)
        hooked = tv.model(**inputs).logits
    assert len(plans) == len(cuts)

    def run(bias: bool) -> torch.Tensor:
        h, sizes, index = hidden[0], torch.ones(hidden.shape[1]), torch.arange(hidden.shape[1])
        bounds = [layer for layer, _ in cuts] + [len(lm.layers)]
        for stage, plan in enumerate(plans):
            kept = plan.index[0]
            h, sizes = _merge_by_hand(h, sizes, torch.isin(index, image).nonzero().flatten(), kept)
            index = index[kept]
            assert math.isclose(float(sizes[torch.isin(index, image)].sum()), image.numel())
            n = index.numel()
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            mask = torch.zeros(n, n).masked_fill(~causal, torch.finfo(h.dtype).min)
            if bias:
                mask = mask + torch.where(causal, sizes.log()[None, :], 0.0)
            p = pos[..., index]
            x = h[None].to(hidden.dtype)
            pe = lm.rotary_emb(x, p[0] if p.shape[0] == 1 else p[-3:])
            for layer in range(bounds[stage], bounds[stage + 1]):
                x = lm.layers[layer](x, attention_mask=mask[None, None], position_embeddings=pe, position_ids=None)
            h = x[0]
        return tv.model.lm_head(lm.norm(h[None]))

    with torch.no_grad():
        reference = run(True)
        torch.testing.assert_close(hooked, reference, atol=1e-5, rtol=1e-5)
        assert (run(False) - reference).abs().max() > 1e-3


def test_merge_dropped_carries_earlier_sizes():
    """A later cut merges tokens that already stand for several: weights and sizes are theirs, and with nothing
    dropped the kept tokens keep their sizes."""
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0]])
    prior = torch.tensor([2.0, 1.0, 3.0, 4.0])
    out = merge_dropped(features, Selection(indices=torch.tensor([0, 1])), prior)
    torch.testing.assert_close(out.sizes, torch.tensor([5.0, 5.0]))
    torch.testing.assert_close(out.embeddings, torch.stack([(2 * features[0] + 3 * features[2]) / 5,
                                                            (features[1] + 4 * features[3]) / 5]))
    kept_all = merge_dropped(features, Selection(indices=torch.tensor([0, 1, 2, 3])), prior)
    torch.testing.assert_close(kept_all.sizes, prior)
    assert kept_all.embeddings is None


# ---- refusals -------------------------------------------------------------------------------------------------

def test_in_llm_refusals():
    tv = model("llava")
    with vtprune.apply(tv.model, "random", site="layer", layer=2, keep=0.5, merge="proportional"):
        cache = StaticCache(config=tv.model.config.get_text_config(), max_cache_len=64)
        with pytest.raises(VTPruneError, match="static cache"):
            tv.model(**batch_inputs(tv, [0]), past_key_values=cache)
    full = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention"]))
    flash = SimpleNamespace(attn_implementation="flash_attention_2", language_model=full, num_layers=4)
    with pytest.raises(VTPruneError, match="flash_attention_2"):
        LayerSite.check(vtprune.RandomConfig(site="layer", layer=2, merge="proportional"), flash)
