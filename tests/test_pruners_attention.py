"""Attention-derived pruners (dart, fastv, pagerank, visionzip, vtc_cls) and their math, each checked against an
independent ground truth. Keep-all identity, clean exact budgets, cached == uncached and batch == single for
every method x family at its default site are in test_pruners_all.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import GEN, batch_inputs, layer_attentions, model
from torch import nn

import vtprune
from vtprune import VTPruneError
from vtprune.capture import LLMQK
from vtprune.methods.dart import DARTConfig, DARTPruner
from vtprune.methods.fastv import FastVPruner, fastv_scores
from vtprune.methods.visionzip import VisionZipPruner
from vtprune.methods.zero_tprune import PagerankConfig
from vtprune.ops import (
    AttentionGraph,
    attention_transpose_apply,
    cls_attention_scores,
    default_vision_layers,
    received_attention,
    top_k,
    weighted_pagerank,
)
from vtprune.registry import _REGISTRY
from vtprune.testing import FAMILIES
from vtprune.view import ImageLayout, VisualView, budget

K = 2


# ---- weighted PageRank ----------------------------------------------------------------------------------
def _graph_qk(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k whose softmax attention is exactly the row-stochastic matrix ``a`` [H, N, N] (scaling 1)."""
    eye = torch.eye(a.shape[-1]).expand_as(a)
    return a.log(), eye


@pytest.mark.parametrize("budget_", [1 << 24, 5])  # one block, and blocks of a single query row
def test_pagerank_is_the_stationary_distribution(budget_):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 7, 7, generator=g) ** 3 + 0.01
    a = a / a.sum(-1, keepdim=True)
    q, k = _graph_qk(a)
    init = torch.full((2, 7), 1 / 7)
    s = weighted_pagerank(q, k, 1.0, init, iters=500, tol=1e-12, budget=budget_)
    for h in range(2):
        vals, vecs = torch.linalg.eig(a[h].T.double())
        v = vecs[:, (vals - 1).abs().argmin()].real
        torch.testing.assert_close(s[h].double(), v / v.sum(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.sum(-1), torch.ones(2))  # mass is preserved


def test_one_iteration_from_uniform_is_mean_received_attention():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 50, 8, generator=g), torch.randn(3, 50, 8, generator=g)
    probs = (q @ k.transpose(-1, -2) * 0.4).softmax(-1)
    init = torch.full((3, 50), 1 / 50)
    for budget_ in (1 << 24, 50 * 7):  # whole matrix, and 7-row query blocks (one head per block on CPU)
        s = weighted_pagerank(q, k, 0.4, init, iters=1, budget=budget_)
        torch.testing.assert_close(s, probs.mean(1))
    graph = AttentionGraph(q, k, 0.4, torch.arange(50), has_cls=False)
    torch.testing.assert_close(received_attention(graph, budget=100), probs.sum(1).mean(0))
    w = torch.rand(3, 50, generator=g)
    torch.testing.assert_close(attention_transpose_apply(q, k, 0.4, w, budget=64), torch.einsum("hq,hqk->hk", w, probs))


@pytest.mark.parametrize("heads_per_block", [1, 3, 4])  # per head (the CPU default), 3 + 1 heads, all heads
@pytest.mark.parametrize("budget_", [1 << 24, 4 * 50 * 7 + 1, 1])  # one block, uneven row blocks, single rows
def test_attention_transpose_apply_blocks_match_the_dense_product(heads_per_block, budget_):
    g = torch.Generator().manual_seed(2)
    q, k, w = torch.randn(4, 50, 8, generator=g), torch.randn(2, 50, 8, generator=g), torch.rand(4, 50, generator=g)
    probs = (q @ k.repeat_interleave(2, 0).transpose(-1, -2) * 0.4).softmax(-1)  # grouped-query keys, 2 heads each
    out = attention_transpose_apply(q, k, 0.4, w, budget=budget_, heads_per_block=heads_per_block)
    torch.testing.assert_close(out, torch.einsum("hq,hqk->hk", w, probs))
    assert not torch.allclose(out, torch.einsum("hq,hqk->hk", w.flip(1), probs))  # the weights are not ignored
    graded = attention_transpose_apply(q.requires_grad_(), k, 0.4, w, budget_, heads_per_block)  # a model's own q
    assert torch.equal(graded, out) and not graded.requires_grad  # a selection signal: detached, not refused


def test_default_vision_layers():
    assert default_vision_layers(list(range(24)), 24) == [22, 23]  # CLIP: penultimate (+ last, unused)
    assert default_vision_layers([7, 15, 23, 31], 32) == [30, 31]  # Qwen2.5-VL: last full-attention block


# ---- probes: real pruners that also record what they saw -------------------------------------------------
@pytest.fixture
def probe():
    made = []

    def make(base: type, **defaults):
        name = f"_probe_{base.config_class.name}"
        cfg = type(f"{name}Config", (base.config_class,), {"name": name})

        class Probe(base):
            config_class = cfg
            seen: list = []

            def select(self, view, k):
                sel = super().select(view, k)
                Probe.seen.append((view, k, sel))
                return sel

        vtprune.register_pruner(Probe)
        made.append(name)
        return name, Probe
    yield make
    for name in made:
        del _REGISTRY[name]


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_scores_equal_eager_last_row(family, probe):
    name, cls = probe(FastVPruner)
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, name, keep=0.4):
        tv.model(**inputs)
    attn = layer_attentions(model(family, "eager"), inputs, K - 1)
    assert len(cls.seen) == 2
    for view, k, sel in cls.seen:
        real = inputs["attention_mask"][view.sample].bool()
        expected = attn[view.sample, :, -1][:, real].mean(0)[view.extras["llm_qk"].image]
        got = fastv_scores(view)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        assert torch.equal(sel.indices, top_k(expected, k).indices)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cls_attention_scores(family, probe):
    """CLIP: the eager [CLS] row of the penultimate layer; Qwen: attention received in the last
    full-attention block pooled per 2x2 group (so an image's tokens share exactly P = 4 V units)."""
    name, cls = probe(VisionZipPruner)
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, name, keep=0.5):
        tv.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    for view, _, _ in cls.seen:
        scores = cls_attention_scores(view)
        if family == "llava":
            tower = model(family, "eager").model.model.vision_tower
            attn = tower(inputs["pixel_values"], output_attentions=True).attentions[-2]
            torch.testing.assert_close(scores, attn[view.image, :, 0, 1:].mean(0), atol=1e-6, rtol=1e-5)
        else:
            assert list(view.extras["vision_qk"]) == [0, 1]  # 0: window attention, 1: full attention
            (vq,) = view.extras["vision_qk"][1]
            received = (vq.query @ vq.key.transpose(-1, -2) * vq.scaling).softmax(-1).mean(0).sum(0)
            expected = torch.zeros(view.num_tokens).index_add_(0, vq.token_of_patch, received)
            torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(scores.sum(), torch.tensor(4.0 * view.num_tokens))


# ---- VisionZip --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["clean", "reference"])
def test_visionzip_dominant_and_contextual_tokens(mode, probe):
    name, cls = probe(VisionZipPruner)
    tv = model("llava")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, name, keep=12, mode=mode):
        tv.model(**inputs)
    out = model("llava", "eager").model.model.vision_tower(inputs["pixel_values"], output_attentions=True,
                                                           output_hidden_states=True)
    projector = tv.model.model.multi_modal_projector
    for view, k, sel in cls.seen:
        n_ctx = round(0.15625 * k)
        cls_attn = out.attentions[-2][view.image, :, 0, 1:].sum(0)
        dominant = top_k(cls_attn, k - n_ctx).indices
        rest = torch.tensor([i for i in range(view.num_tokens) if i not in dominant.tolist()])
        targets = rest[:: len(rest) // n_ctx][:n_ctx]
        others = torch.tensor([i for i in rest.tolist() if i not in targets.tolist()])
        keys = F.normalize(view.extras["vision_qk"][0][0].key.mean(0), dim=-1)  # penultimate layer
        assign = (keys[others] @ keys[targets].T).argmax(-1)
        x = out.hidden_states[-2][view.image, 1:]
        assert torch.equal(sel.indices, torch.sort(torch.cat([dominant, targets])).values)
        kept = sel.indices.tolist()
        torch.testing.assert_close(sel.embeddings[[kept.index(i) for i in dominant.tolist()]], view.features[dominant])
        for t, target in enumerate(targets.tolist()):
            group = x[others[assign == t]]
            merged = (x[target] + group.mean(0) if len(group) else x[target]) if mode == "reference" \
                else torch.cat([x[target:target + 1], group]).mean(0)
            torch.testing.assert_close(sel.embeddings[kept.index(target)], projector(merged), atol=1e-5, rtol=1e-5)


# ---- DART -------------------------------------------------------------------------------------------------
def _dart_view(seed: int = 0) -> tuple[VisualView, list[int]]:
    """20 image tokens: 4 pivots (largest keys), 10 distinct tokens and 6 exact copies of pivots; 6 text
    tokens after the image, 4 of them text pivots. Pivots are orthogonal; every distinct token has a
    negative cosine with every pivot, so each pivot prefers distinct tokens over any duplicate."""
    g = torch.Generator().manual_seed(seed)
    d, v = 32, 20
    basis = torch.eye(d)
    pivot_h = basis[:8] * 3  # 4 image + 4 text pivots
    distinct = -basis[:8].sum(0) / 8 + 0.3 * torch.cat([torch.zeros(10, 8), torch.randn(10, d - 8, generator=g)], 1)
    image = torch.cat([pivot_h[:4], distinct, pivot_h[[0, 1, 2, 3, 0, 1]]])
    perm = torch.randperm(v, generator=g)
    image = image[perm]
    duplicates = perm.argsort()[14:].tolist()
    text = torch.cat([torch.randn(2, d, generator=g), pivot_h[4:]])  # text rows after the image
    key_l1 = torch.ones(v + len(text))
    key_l1[perm.argsort()[:4]] = 10  # image pivots
    key_l1[v + 2:] = 10  # text pivots
    key = key_l1.view(1, -1, 1) / 4 * torch.ones(1, 1, 4)
    qk = LLMQK(query=torch.zeros(1, len(key_l1), 4), key=key, image=torch.arange(v),
               text=torch.arange(v, v + len(text)), scaling=1.0)
    view = VisualView(features=image, text=text, layout=ImageLayout.flat(v), site="layer", layer=K, sample=0,
                      image=0, extras={"llm_qk": qk, "final_norm": nn.Identity()})
    return view, duplicates


@pytest.mark.parametrize("mode", ["clean", "reference"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dart_drops_planted_duplicates_first(mode, seed):
    view, duplicates = _dart_view(seed)
    pruner = DARTPruner(DARTConfig(keep=14, mode=mode))
    k = pruner.count(view.layout)
    assert k == 14 if mode == "clean" else k == 4 + 8 * (14 // 8)
    kept = set(pruner.select(view, k).indices.tolist())
    assert len(kept) == k
    if mode == "clean":  # the budget is exactly the non-duplicates
        assert kept == set(range(20)) - set(duplicates)
    else:
        assert not kept & set(duplicates)


@pytest.mark.parametrize("keep,size,expected", [(128, 576, 132), (192, 576, 196), (64, 576, 68),
                                                (320, 2000, 324), (0.25, 1000, 4 + 8 * 31), (1.0, 50, 50)])
def test_dart_reference_counts(keep, size, expected):
    layout = ImageLayout.flat(size)
    assert DARTPruner(DARTConfig(keep=keep, mode="reference")).count(layout) == expected
    assert DARTPruner(DARTConfig(keep=keep)).count(layout) == budget(keep, size)


def test_dart_reference_counts_in_a_ragged_batch():
    tv = model("qwen2_vl")
    with vtprune.apply(tv.model, "dart", keep=0.5, mode="reference") as handle:
        tv.model(**batch_inputs(tv, [0, 1]))
        images = [img for s in handle.stats.samples for img in s.images]
    assert len({before for before, _ in images}) > 1  # ragged
    for before, after in images:
        assert after == 4 + 8 * (min(before // 2, before - 4) // 8)


# ---- non-default options still generate consistently ------------------------------------------------------
def _generate(tv, inputs, **kw):
    out = tv.model.generate(**inputs, **{**GEN, **kw})
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("family,pruner,options", [
    ("llava_next", "dart", dict(mode="reference", keep=20)),
    ("llava_next", "visionzip", dict(mode="reference", keep=0.5)),
    ("qwen2_5_vl", "visionzip", dict(keep=0.5, contextual=0.5)),
    ("llava_next", "pagerank", dict(keep=0.3, wpr_iters=50, wpr_tol=1e-6, head_variance=None)),
    ("qwen2_vl", "pagerank", dict(keep=0.3, similarity_share=1.0)),
    ("llava", "vtc_cls", dict(keep=5, start_layer=-2)),
    ("llava", "fastv", dict(keep=0.5, layer=3)),
])
def test_options_cached_equals_uncached(family, pruner, options):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, pruner, **options) as handle:
        seq_c, step_c = _generate(tv, inputs)
        assert handle.stats.visual_after != handle.stats.visual_before
        seq_u, step_u = _generate(tv, inputs, use_cache=False)
    assert torch.equal(seq_c, seq_u)
    torch.testing.assert_close(step_c, step_u, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pruner,options,match", [
    ("dart", dict(mode="exact"), "mode="),
    ("dart", dict(image_pivots=-1), "image_pivots="),
    ("dart", dict(image_pivots=0, text_pivots=0), "at least one pivot"),
    ("visionzip", dict(contextual=1.0), "contextual="),
    ("pagerank", dict(wpr_iters=0), "wpr_iters="),
    ("pagerank", dict(head_variance=(0.5, 0.1)), "head_variance="),
    ("pagerank", dict(similarity_share=2), "similarity_share="),
    ("vtc_cls", dict(start_layer="a"), "start_layer="),
    ("vtc_cls", dict(start_layer=1), "start_layer=1 leaves no layer"),  # the tiny CLIP has 2 layers
])
def test_bad_options_name_the_field(pruner, options, match):
    with pytest.raises(VTPruneError, match=match):
        vtprune.apply(model("llava").model, pruner, keep=0.5, **options)


# ---- Zero-TPrune on a timm ViT ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval(), torch.randn(2, 3, 224, 224)


def test_timm_pagerank_keep_all_is_identity(deit):
    vit, x = deit
    with torch.no_grad():
        ref = vit(x)
        with vtprune.apply(vit, "pagerank", keep=1.0) as handle:  # dispatches to the timm patch
            assert torch.equal(vit(x), ref)
            assert handle.seq_lens == [197] * 12


@pytest.mark.parametrize("keep,kept", [(0.5, 98), (40, 40)])
def test_timm_pagerank_prunes_between_blocks(deit, keep, kept):
    from vtprune.timm_patch import apply_timm

    vit, x = deit
    with torch.no_grad():
        ref = vit(x)
        with apply_timm(vit, PagerankConfig(keep=keep, vit_blocks=(2, 5, 8))) as handle:
            assert vit.forward_features(x).shape == (2, 1 + kept, 192)
            steps = [196 - (196 - kept) * i // 3 for i in (1, 2, 3)]
            assert handle.seq_lens == [197] * 3 + [1 + steps[0]] * 3 + [1 + steps[1]] * 3 + [1 + steps[2]] * 3
            logits = vit(x)
            assert logits.shape == (2, 1000) and not torch.equal(logits, ref)
        assert torch.equal(vit(x), ref)  # removed cleanly


def test_timm_model_with_another_pruner_is_a_clear_error(deit):
    with pytest.raises(VTPruneError, match="pagerank"):
        vtprune.apply(deit[0], "random", keep=0.5)
