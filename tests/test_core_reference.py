"""Pruning equals running the *unhooked* model on a hand-shortened input with the expected positions.

Each reference is computed from stock modules only (language model, decoder layers, rotary embedding,
norm, LM head), and each test has a negative control showing it can tell the position policies apart.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from conftest import ATTN, batch_inputs, model
from vtprune.ops import lattice
from vtprune.testing import FAMILIES, shortened_lm_inputs


def _capture(module: torch.nn.Module, run) -> tuple[tuple, dict]:
    """Run ``run()`` and return the (args, kwargs) ``module`` was first called with."""
    seen: list = []
    h = module.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))) if not seen else None,
                                         with_kwargs=True)
    try:
        run()
    finally:
        h.remove()
    return seen[0]


def _uniform_keep(tv, inputs, keep: float) -> torch.Tensor:
    """Sequence indices kept by the 'uniform' pruner: every text token + a lattice of each image's tokens."""
    ids = inputs["input_ids"][0]
    img = (ids == tv.model.config.image_token_id).nonzero().flatten()
    with vtprune.apply(tv.model, "uniform", keep=keep) as h:
        tv.model(**inputs)
        per_image = [b for b, _ in h.stats.samples[0].images]
    kept, start = [], 0
    for n in per_image:
        k = max(1, int(keep * n + 0.5))
        kept.append(img[start:start + n][lattice(n, k).indices])
        start += n
    keep_mask = ids != tv.model.config.image_token_id
    keep_mask[torch.cat(kept)] = True
    return keep_mask.nonzero().flatten()


def _full_positions(tv, lm_kwargs, length: int) -> torch.Tensor:
    """The [A, 1, L] positions the unhooked language model used."""
    pos = lm_kwargs.get("position_ids")
    if pos is None:
        return torch.arange(length).view(1, 1, -1)
    return pos[None] if pos.dim() == 2 else pos


def _kept_types(inputs: dict, keep: torch.Tensor) -> torch.Tensor | None:
    """The hand-shortened ``token_type_ids`` (Gemma 3's bidirectional image blocks are read from them), if any."""
    types = inputs.get("token_type_ids")
    return None if types is None else types[:, keep]


def _lm_logits(tv, embeds, pos, mask, token_type_ids=None, extras=None) -> torch.Tensor:
    pos = pos[0] if pos.shape[0] == 1 else pos
    if token_type_ids is not None:  # the backbone builds the per-layer masks (image blocks) from them
        hidden = tv.model.model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask,
                                token_type_ids=token_type_ids).last_hidden_state
    else:
        hidden = tv.model.model.language_model(inputs_embeds=embeds, position_ids=pos,
                                               attention_mask=mask, **(extras or {})).last_hidden_state
    return tv.model.lm_head(hidden)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_pre_llm_matches_manual_reference(family, attn):
    tv = model(family, attn)
    inputs = batch_inputs(tv, [1])
    _, lm_kw = _capture(tv.model.model.language_model, lambda: tv.model(**inputs))
    embeds = lm_kw["inputs_embeds"]
    keep = _uniform_keep(tv, inputs, 0.4)
    pos = _full_positions(tv, lm_kw, embeds.shape[1])
    ones = torch.ones(1, keep.numel(), dtype=torch.long)
    types = _kept_types(inputs, keep)
    extras = shortened_lm_inputs(lm_kw, keep)
    original = _lm_logits(tv, embeds[:, keep], pos[..., keep], ones, types, extras)
    compact = _lm_logits(tv, embeds[:, keep], torch.arange(keep.numel()).expand(pos.shape[0], 1, -1), ones, types,
                         extras)
    with vtprune.apply(tv.model, "uniform", keep=0.4, positions="original"):
        hooked_original = tv.model(**inputs).logits
    with vtprune.apply(tv.model, "uniform", keep=0.4, positions="compact"):
        hooked_compact = tv.model(**inputs).logits
    torch.testing.assert_close(hooked_original, original, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hooked_compact, compact, atol=1e-6, rtol=1e-6)
    assert (original - compact).abs().max() > 1e-3  # negative control: the policies are distinguishable


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_kept_positions_are_full_sequence_mrope(family):
    """Kept tokens carry exactly get_rope_index(full sequence)[..., kept]."""
    tv = model(family)
    inputs = batch_inputs(tv, [0])
    full, _ = tv.model.model.get_rope_index(
        inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"])
    keep = _uniform_keep(tv, inputs, 0.25)
    with vtprune.apply(tv.model, "uniform", keep=0.25):
        _, lm_kw = _capture(tv.model.model.language_model.layers[0], lambda: tv.model(**inputs))
    cos, sin = lm_kw["position_embeddings"]
    ref_cos, ref_sin = tv.model.model.language_model.rotary_emb(cos, full[..., keep])
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert not torch.equal(full[..., keep], torch.arange(keep.numel()).expand(3, 1, -1))


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_site_matches_manual_reference(family, attn):
    if family == "gemma3":
        pytest.skip("per-layer-type masks and rotary tables: tests/test_family_gemma3.py has its reference")
    K = 2
    tv = model(family, attn)
    inputs = batch_inputs(tv, [1])
    lm = tv.model.model.language_model
    _, lm_kw = _capture(lm, lambda: tv.model(**inputs))
    (hidden_k,), _ = _capture(lm.layers[K], lambda: tv.model(**inputs))
    keep = _uniform_keep(tv, inputs, 0.4)
    pos = _full_positions(tv, lm_kw, hidden_k.shape[1])
    n = keep.numel()
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    mask = causal if attn == "sdpa" else torch.zeros(1, 1, n, n).masked_fill(~causal, torch.finfo(torch.float32).min)

    recurrent = vtprune.models.adapter_for(tv.model).recurrent_layers
    deepstack = shortened_lm_inputs(lm_kw, keep)  # DeepStack levels still to add after layers K.. (Qwen3-VL)
    levels = deepstack.get("deepstack_visual_embeds", [])

    def run_tail(positions: torch.Tensor) -> torch.Tensor:
        h = hidden_k[:, keep]
        rope_pos = positions[0] if positions.shape[0] == 1 else positions[-3:]
        pe = lm.rotary_emb(h, rope_pos)
        for i, layer in enumerate(lm.layers[K:], K):  # recurrent layers take no 4-D mask (none: no padding)
            h = layer(h, attention_mask=None if i in recurrent else mask, position_embeddings=pe, position_ids=None)
            if i < len(levels):
                h = lm._deepstack_process(h, deepstack["visual_pos_masks"], levels[i])
        return tv.model.lm_head(lm.norm(h))

    reference = run_tail(pos[..., keep])
    with vtprune.apply(tv.model, "uniform", keep=0.4, site="layer", layer=K):
        hooked = tv.model(**inputs).logits
    torch.testing.assert_close(hooked, reference, atol=1e-5, rtol=1e-5)
    renumbered = run_tail(torch.arange(n).expand(pos.shape[0], 1, -1))
    assert (renumbered - reference).abs().max() > 1e-3  # negative control


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_pool_replaces_states_with_window_means(family):
    """keep 0.25 of a 4x4 grid = 2x2 pooling: the LM input holds each window's mean at its top-left slot."""
    tv = model(family)
    inputs = batch_inputs(tv, [0])
    _, full_kw = _capture(tv.model.model.language_model, lambda: tv.model(**inputs))
    img = (inputs["input_ids"][0] == tv.model.config.image_token_id).nonzero().flatten()
    assert img.numel() == 16
    grid = full_kw["inputs_embeds"][0, img].reshape(2, 2, 2, 2, -1)  # [wr, r, wc, c, D]
    means = grid.mean(dim=(1, 3)).reshape(4, -1)
    with vtprune.apply(tv.model, "pool", keep=0.25):
        _, kw = _capture(tv.model.model.language_model, lambda: tv.model(**inputs))
    start = int(img[0])  # the pooled tokens follow the text before the image
    pooled = kw["inputs_embeds"][0, start:start + 4]
    torch.testing.assert_close(pooled, means.to(pooled.dtype))
    assert kw["inputs_embeds"].shape[1] == inputs["input_ids"].shape[1] - 12
    pos = kw["position_ids"]
    top_left = img[torch.tensor([0, 2, 8, 10])]
    expected = full_kw["position_ids"][..., top_left] if full_kw.get("position_ids") is not None else top_left
    assert torch.equal(pos[..., start:start + 4].reshape(-1), expected.reshape(-1))
