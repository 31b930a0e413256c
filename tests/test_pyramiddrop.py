"""PyramidDrop: its schedule and counts, and its rank against a direct hand computation on a tiny model.

Keep-all identity, exact final budgets, cached == uncached and batch == single on every family are in
tests/test_pruners_all.py (every registered pruner); the multi-stage engine itself in tests/test_multistage.py."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, model
from test_core_reference import _capture
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import vtprune
from vtprune.methods.pyramiddrop import default_layers


@pytest.mark.parametrize("mode,keep,expected", [
    ("clean", 0.125, [16, 8, 4, 2]), ("reference", 0.125, [16, 8, 4, 2]),
    ("clean", 0.3, [16, 11, 7, 5]), ("reference", 0.3, [16, 10, 7, 4]), ("clean", 3, [16, 12, 6, 3]),
])
def test_keeps_exactly_its_budget_per_cut(mode, keep, expected):
    """clean: ⌊V·keep^(s/3) + 1/2⌋ (the last cut exactly keep's budget); reference: int(V·λ^s); int keep k: 4k, 2k, k."""
    tv = model("llava")
    with vtprune.apply(tv.model, "pyramiddrop", keep=keep, mode=mode) as handle:
        tv.model(**batch_inputs(tv, [0, 1]))
        assert [s.layer_visual for s in handle.stats.samples] == [expected] * 2
        assert [layer for layer, _ in handle.config.schedule] == [1, 2, 3]


def test_default_layers_rule():
    assert default_layers(32, list(range(1, 32))) == (8, 16, 24)
    assert default_layers(40, list(range(1, 40))) == (8, 16, 24)
    assert default_layers(28, list(range(1, 28))) == (7, 14, 21)
    assert default_layers(4, [1, 2, 3]) == (1, 2, 3)
    assert default_layers(2, [1]) == (1,)
    assert default_layers(32, [7, 11, 15, 19, 23, 27, 31]) == (7, 15, 23)  # Qwen3.5: full attention every 4th layer
    with pytest.raises(vtprune.VTPruneError, match="no decoder layer"):
        default_layers(32, [])


def test_options_and_refusals():
    tv = model("llava")
    with vtprune.apply(tv.model, "pyramiddrop", layers=[1, 3], keep=0.25) as handle:
        assert handle.config.schedule == ((1, 0.5), (3, 0.25))
    with vtprune.apply(tv.model, "pyramiddrop", layer=2, keep=0.25) as handle:
        assert handle.config.schedule is None and handle.config.layer == 2  # one cut
    for bad, match in [({"layers": [2, 2]}, "strictly increase"), ({"layers": []}, "non-empty"),
                       ({"positions": "compact"}, "positions='compact'"), ({"site": "pre_llm"}, "in-LLM"),
                       ({"layers": [1, 4]}, "out of range")]:
        with pytest.raises(vtprune.VTPruneError, match=match):
            vtprune.apply(tv.model, "pyramiddrop", **bad)
    with pytest.raises(vtprune.VTPruneError, match="linear-attention"):  # Qwen3.5's layer 2 has no attention map
        vtprune.apply(model("qwen3_5").model, "pyramiddrop", layers=[2, 3])
    with vtprune.apply(model("qwen3_5").model, "pyramiddrop") as handle:  # snapped to its one usable layer
        assert handle.config.schedule == ((3, 0.125),)


def _hand_scores(lm, b: int, hidden: torch.Tensor, pos: torch.Tensor, image: torch.Tensor, layer_of: int
                 ) -> torch.Tensor:
    """Layer ``layer_of``'s input norm, q/k projections and RoPE on ``hidden`` [1, n, D] (positions ``pos``), the last
    token's query row, fp32 softmax over all keys, head mean, image columns."""
    layer = lm.layers[layer_of]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    n = x.shape[1]
    q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, pos[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    logits = (q[:, :, -1:].float() @ k.float().transpose(-1, -2)) * attn.scaling
    return logits.softmax(-1).mean(1)[0, 0, image]


def test_rank_matches_a_hand_computation():
    """At each cut b the scores are layer b's own attention row of the last prompt token on layer b-1's output (the
    tokens still present, their original positions); the kept tokens are its top-k. Negative control: layer b-1's
    projections (FastV's convention) rank differently."""
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    lm = tv.model.model.language_model
    outputs: dict[int, torch.Tensor] = {}
    hooks = [lm.layers[b - 1].register_forward_hook(lambda m, a, o, b=b: outputs.__setitem__(b, o[0] if isinstance(
        o, tuple) else o)) for b in (1, 2, 3)]
    try:
        with vtprune.apply(tv.model, "pyramiddrop", keep=0.125) as handle:
            seen = []
            for stage in handle._engine.site.stages:
                original = stage.pruner.score
                stage.pruner.score = lambda view, f=original: seen.append(f(view)) or seen[-1]
            plans, select = [], handle._engine.select
            handle._engine.select = lambda *a, **k: plans.append(select(*a, **k)) or plans[-1]
            tv.model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    index = torch.arange(inputs["input_ids"].shape[1])
    is_image = inputs["input_ids"][0] == tv.model.config.image_token_id
    for stage, b in enumerate((1, 2, 3)):
        image = is_image[index].nonzero().flatten()
        scores = _hand_scores(lm, b, outputs[b], index, image, b)
        torch.testing.assert_close(seen[stage], scores, atol=1e-6, rtol=1e-5)
        k = image.numel() // 2
        kept_here = plans[stage].index[0]
        kept_image = torch.isin(kept_here, image).nonzero().flatten()
        assert kept_image.numel() == k
        assert torch.equal(kept_here[kept_image], image[torch.topk(scores, k).indices.sort().values])
        fastv_like = _hand_scores(lm, b, outputs[b], index, image, b - 1)
        assert (fastv_like - scores).abs().max() > 1e-4
        index = index[kept_here]


def test_reference_mode_renumbers_each_group_exactly():
    """mode='reference': each layer group runs on its survivors numbered 0..N-1 (== the unhooked layers by hand with
    those positions; negative control: the original positions differ), decodes from its own cache length (cached ==
    uncached) and a padded batch row == the sample alone. Qwen's M-RoPE cannot be renumbered so: refused."""
    tv = model("llava")
    inputs = batch_inputs(tv, [1])
    lm = tv.model.model.language_model
    (hidden,), _ = _capture(lm.layers[1], lambda: tv.model(**inputs))
    with vtprune.apply(tv.model, "pyramiddrop", keep=0.125, mode="reference") as handle:
        plans, select = [], handle._engine.select
        handle._engine.select = lambda *a, **k: plans.append(select(*a, **k)) or plans[-1]
        hooked = tv.model(**inputs).logits

    def run(renumber: bool) -> torch.Tensor:
        h, index = hidden, torch.arange(hidden.shape[1])
        for layer, plan in zip((1, 2, 3), plans):
            h, index = h[:, plan.index[0]], index[plan.index[0]]
            pos = torch.arange(index.numel()) if renumber else index
            h = lm.layers[layer](h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos[None]))
        return tv.model.lm_head(lm.norm(h))

    torch.testing.assert_close(hooked, run(True), atol=1e-5, rtol=1e-5)
    assert (run(False) - hooked).abs().max() > 1e-3
    batch = batch_inputs(tv, [0, 1])
    gen = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with vtprune.apply(tv.model, "pyramiddrop", keep=0.125, mode="reference"):
        cached = tv.model.generate(**batch, **gen)
        uncached = tv.model.generate(**batch, **gen, use_cache=False)
        single = tv.model.generate(**batch_inputs(tv, [1]), **gen)
    torch.testing.assert_close(torch.stack(cached.logits, 1), torch.stack(uncached.logits, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(cached.logits, 1)[1], torch.stack(single.logits, 1)[0], atol=1e-5,
                               rtol=1e-5)
    reference = tv.model.generate(**batch, **gen)
    with vtprune.apply(tv.model, "pyramiddrop", keep=1.0, mode="reference"):  # nothing dropped: nothing renumbered
        assert torch.equal(torch.stack(tv.model.generate(**batch, **gen).logits, 1), torch.stack(reference.logits, 1))
    with vtprune.apply(tv.model, "pyramiddrop", keep=0.125):  # clean: the original positions, so it differs
        clean = tv.model.generate(**batch, **gen)
    assert (torch.stack(clean.logits, 1) - torch.stack(cached.logits, 1)).abs().max() > 1e-3
    with pytest.raises(vtprune.VTPruneError, match="renumbers"):
        vtprune.apply(model("qwen2_vl").model, "pyramiddrop", mode="reference")
