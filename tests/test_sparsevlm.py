"""SparseVLM: its budget table and recycling arithmetic, exact per-cut budgets, raters and scores against a direct
hand computation from eager attention probabilities (with negative controls), recycled tokens = plain cluster means,
reference mode, and DPC-KNN on hand-computed cases.

Keep-all identity, exact final budgets, cached == uncached and batch == single on every family are in
tests/test_pruners_all.py (every registered pruner)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GEN, batch_inputs, model

import vtprune
from vtprune import ops
from vtprune.methods.sparsevlm import TABLE, default_layers, recycled, split


def test_table_and_recycling_arithmetic():
    """Every row of v1.5's table: top-k + ⌊(⌊0.3·|D|⌋+1)/10⌋+1 recycled = the visual tokens out of each cut, and
    :func:`split` recovers k from that total; the default cuts are the reference's 3/7/16 (scaled when shallower)."""
    for kept, out in TABLE.values():
        v = 576
        for k, total in zip(kept, out):
            assert k + recycled(v - k)[1] == total
            assert split(total, v) == k
            v = total
    assert recycled(276) == (83, 9) and recycled(0) == (0, 0)
    assert split(2, 100) == 2  # even one kept token + one cluster overshoots: no recycling
    assert default_layers(32, list(range(1, 32))) == (3, 7, 16)
    assert default_layers(28, list(range(1, 28))) == (3, 6, 14)
    assert default_layers(4, [1, 2, 3]) == (1, 2, 3)
    assert default_layers(4, [2]) == (2,)


@pytest.mark.parametrize("family,options,expected", [
    ("llava", {}, [[16, 9, 6, 3]] * 2),  # 309/204/113 of 576, scaled to V = 16
    ("llava", {"keep": 0.3, "recycle": False}, [[16, 13, 9, 5]] * 2),  # row 192 without recycling: 300/200/110 × 0.3·16/110
    ("llava", {"keep": 3}, [[16, 14, 5, 3]] * 2),  # int: row 64 (82/32/18) scaled by 3/18
    ("qwen2_vl", {}, [[16, 9, 6, 3], [8, 4, 3, 2]]),
    ("llava", {"schedule": [(1, 10), (3, 4)]}, [[16, 10, 10, 4]] * 2),  # given cuts: each leaves its budget
])
def test_keeps_exactly_its_budget_per_cut(family, options, expected):
    tv = model(family)
    with vtprune.apply(tv.model, "sparsevlm", **options) as handle:
        tv.model(**batch_inputs(tv, [0, 1]))
        assert [s.layer_visual for s in handle.stats.samples] == expected
        assert [layer for layer, _ in handle.config.schedule] == ([1, 3] if "schedule" in options else [1, 2, 3])


def _spy(handle) -> tuple[list, list, list]:
    """Record every cut's scores and selections, and the engine's keep plans."""
    scores, selections, plans = [], [], []
    for stage in handle._engine.site.stages:
        score, select = stage.pruner.score, stage.pruner.select
        stage.pruner.score = lambda view, f=score: scores.append(f(view)) or scores[-1]
        stage.pruner.select = lambda view, k, f=select: selections.append(f(view, k)) or selections[-1]
    select = handle._engine.select
    handle._engine.select = lambda *a, **k: plans.append(select(*a, **k)) or plans[-1]
    return scores, selections, plans


def test_raters_scores_and_recycling_match_a_hand_computation():
    """At each cut K the scores are, over the raters (text tokens after the image whose mean softmax-over-text
    relevance to the image's layer-0 embeddings is above the mean) and heads, layer K-1's eager attention
    probabilities to the image tokens still present; the cut keeps the top k and adds cluster means of the best deleted
    tokens (DPC-KNN with the pruner's seeded noise) at their centres' slots. Negative controls: every text token as a
    rater, or layer K's attention, score differently."""
    tv = model("llava", "eager")
    inputs = batch_inputs(tv, [0])
    ids = inputs["input_ids"][0]
    lm = tv.model.model.language_model
    embeds: list[torch.Tensor] = []
    hook = lm.layers[0].register_forward_pre_hook(lambda m, a, k: embeds.append(a[0] if a else k["hidden_states"]),
                                                  with_kwargs=True)
    try:
        with vtprune.apply(tv.model, "sparsevlm") as handle:
            scores, selections, plans = _spy(handle)
            out = tv.model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    unhooked = tv.model(**inputs, output_attentions=True)
    image = (ids == tv.model.config.image_token_id).nonzero().flatten()
    after = torch.arange(int(image.max()) + 1, ids.numel())
    e = embeds[0][0].float()
    relevance = (e[image] @ e[after].T).softmax(-1).mean(0)
    rater = after[relevance > relevance.mean()]
    assert 0 < rater.numel() < after.numel()
    index = torch.arange(ids.numel())  # original position of each token still present
    for stage, cut in enumerate((1, 2, 3)):
        attn = out.attentions[cut - 1][0]  # [H, L', L'] on the tokens present at layer cut-1
        row, col = torch.isin(index, rater).nonzero().flatten(), torch.isin(index, image).nonzero().flatten()
        hand = attn[:, row][:, :, col].float().mean((0, 1))
        torch.testing.assert_close(scores[stage], hand, atol=1e-6, rtol=1e-5)
        every = torch.isin(index, after).nonzero().flatten()
        assert (attn[:, every][:, :, col].float().mean((0, 1)) - hand).abs().max() > 1e-4  # all text as raters
        if stage == 0:  # layer K's own attention (the unhooked model's, on the same tokens)
            wrong = unhooked.attentions[cut][0]
            assert (wrong[:, row][:, :, col].float().mean((0, 1)) - hand).abs().max() > 1e-4
        features = out.hidden_states[cut][0][col]  # layer cut's input = layer cut-1's output
        sel, v = selections[stage], col.numel()
        k = sel.indices.numel()
        kept = split(k, v)
        top = torch.topk(hand, kept).indices.sort().values
        deleted = torch.ones(v, dtype=torch.bool)
        deleted[top] = False
        cand = deleted.nonzero().flatten()
        n, c = recycled(cand.numel())
        best = cand[torch.sort(hand[cand], descending=True, stable=True).indices[:n]]
        g = torch.Generator().manual_seed(v)  # the pruner's seeded generator (seed 0, V tokens)
        centres, assign = ops.dpc_knn(features[best], c, g)
        assert torch.equal(sel.indices, torch.cat([top, best[centres]]).sort().values)
        host = torch.isin(sel.indices, best[centres])
        assert c >= 1 and int(host.sum()) == c and k == kept + c
        assert torch.equal(sel.embeddings[~host], features[top])
        means = torch.stack([features[best][assign == j].float().mean(0) for j in range(c)]).to(features.dtype)
        order = torch.argsort(best[centres])
        torch.testing.assert_close(sel.embeddings[host], means[order])
        index = index[plans[stage].index[0]]


def test_reference_mode_cached_equals_uncached_and_refusals():
    """mode='reference' (v1.5's compact positions per layer group): cached == uncached generation on LLaVA; Qwen's
    M-RoPE cannot be renumbered so it is refused by name, as is a cut at a site without decoder attention."""
    tv = model("llava")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "sparsevlm", keep=0.3, mode="reference"):
        cached = tv.model.generate(**inputs, **GEN)
        uncached = tv.model.generate(**inputs, **GEN, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits, 1), torch.stack(uncached.logits, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(vtprune.VTPruneError, match="mode='reference'"):
        vtprune.apply(model("qwen2_vl").model, "sparsevlm", mode="reference")
    for bad, match in [({"site": "pre_llm"}, "site='layer'|in-LLM"), ({"recycle": 1}, "recycle"),
                       ({"positions": "compact"}, "positions='compact'")]:
        with pytest.raises(vtprune.VTPruneError, match=match):
            vtprune.apply(tv.model, "sparsevlm", **bad)


def test_dpc_knn_hand_computed_case():
    """Points 0, 2, 3.5, 10 (D = 1), 3 clusters: densities exp(-mean sq. distance to the 3 nearest) order them
    2 > 3.5 > 0 > 10; δ = 10 (peak), 1.5, 2, 6.5; δ·density picks 2, 3.5, 0 as centres and 10 joins 3.5."""
    x = torch.tensor([[0.0], [2.0], [3.5], [10.0]])
    density = torch.tensor([(0 + 4 + 12.25) / 3, (0 + 2.25 + 4) / 3, (0 + 2.25 + 12.25) / 3, (0 + 42.25 + 64) / 3])
    score = torch.tensor([2.0, 10.0, 1.5, 6.5]) * (-density).exp()
    assert torch.equal(torch.topk(score, 3).indices, torch.tensor([1, 2, 0]))
    centres, assign = ops.dpc_knn(x, 3, torch.Generator().manual_seed(0))
    assert centres.tolist() == [1, 2, 0] and assign.tolist() == [2, 0, 1, 1]
    torch.testing.assert_close(ops.cluster_means(x, assign, 3), torch.tensor([[2.0], [6.75], [0.0]]))
    with pytest.raises(vtprune.VTPruneError, match="clusters"):
        ops.dpc_knn(x, 5)


def test_dpc_knn_separates_two_blobs():
    """Two well-separated blobs, 2 clusters: one centre in each, every point with its own blob (any seed)."""
    g = torch.Generator().manual_seed(1)
    blob = torch.randn(12, 8, generator=g) * 0.1
    x = torch.cat([blob[:6] + 5.0, blob[6:] - 5.0])
    for seed in range(3):
        centres, assign = ops.dpc_knn(x, 2, torch.Generator().manual_seed(seed))
        assert sorted(int(c) // 6 for c in centres) == [0, 1]
        side = assign[centres[0]]
        assert torch.equal(assign == side, torch.arange(12) // 6 == int(centres[0]) // 6)
    assert math.isclose(float(ops.cluster_means(x, assign, 2).abs().mean()), 5.0, rel_tol=0.05)


def test_per_frame_raters_are_the_text_after_each_frame():
    """Per-frame selection on a Qwen3-VL video (timestamps between frames): each frame's raters are the text after
    that frame at layer 0 and at the cut alike (the video's own text-after count does not stand for a frame)."""
    from test_video import video_inputs

    tv = model("qwen3_vl")
    inputs = video_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "sparsevlm", keep=0.25, layer=2, per_frame=True) as handle:
        tv.model(**inputs)
        assert handle.stats.visual_after != handle.stats.visual_before
