"""Diversity pruners (zoo, mmr, divprune, kcenter), their greedy selectors and the ZO sensitivity scorer:
each selector against a naive re-implementation of its rule, the ZO estimate against Monte Carlo, exact
budgets and generation on every family, cached == uncached."""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch
from conftest import GEN, batch_inputs, model
from torch import nn

import vtprune
from vtprune import ops
from vtprune.capture import ProjectorInput
from vtprune.errors import VTPruneError
from vtprune.methods import zoo
from vtprune.methods.zero_tprune import pagerank_scores
from vtprune.methods.zoo import anyres_views
from vtprune.registry import _REGISTRY, build_pruner, make_config
from vtprune.testing import FAMILIES
from vtprune.view import ImageLayout, VisualView, budget

METHODS = ("zoo", "mmr", "divprune", "kcenter")


def _view(features: torch.Tensor, text: torch.Tensor | None = None, **extras) -> VisualView:
    text = torch.zeros(0, features.shape[1]) if text is None else text
    return VisualView(features=features, text=text, layout=ImageLayout.flat(features.shape[0]), site="pre_llm",
                      layer=None, sample=0, image=0, extras=extras)


def _select(name: str, view: VisualView, k: int, **options) -> list[int]:
    return build_pruner(make_config(name, keep=k, **options)).select(view, k).indices.tolist()


def _cos(x: torch.Tensor) -> torch.Tensor:
    u = ops.unit_rows(x)
    return u @ u.T


def _naive_greedy(dist: torch.Tensor, k: int, first: int, weight: torch.Tensor | None = None) -> list[int]:
    """argmax_i w_i · min_{j∈P} dist[j, i] over unpicked i, recomputing minima every step (O(k²V))."""
    picks = [first]
    while len(picks) < k:
        best, arg = -math.inf, -1
        for i in range(dist.shape[0]):
            if i in picks:
                continue
            s = min(float(dist[j, i]) for j in picks) * (1.0 if weight is None else float(weight[i]))
            if s > best:
                best, arg = s, i
        picks.append(arg)
    return sorted(picks)


# ---- selectors against their rules ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_mmr_lambda_extremes(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 8, generator=g) * torch.rand(40, 1, generator=g)
    view, norm = _view(x), x.norm(dim=-1)
    top = sorted(torch.topk(norm, 7).indices.tolist())
    assert _select("mmr", view, 7, lam=1.0) == top
    pure = ops.max_min(ops.on_demand(ops.unit_rows(x)), 40, 7, norm.argmax(), "cpu")
    assert _select("mmr", view, 7, lam=0.0) == sorted(pure.tolist())
    assert _select("mmr", view, 7, lam=0.0) == _naive_greedy(1 - _cos(x), 7, int(norm.argmax()))


@pytest.mark.parametrize("seed", range(20))
def test_divprune_is_greedy_max_min_and_half_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 4, generator=g)
    cos = _cos(x)
    dist = 1 - cos
    nearest = dist.masked_fill(torch.eye(9, dtype=torch.bool), math.inf).amin(0)
    picks = _select("divprune", _view(x), 3)
    assert picks == _naive_greedy(dist, 3, int(nearest.argmax()))
    # greedy max-min is a 1/2-approximation in a metric: the angle (1 - cos is monotone in it, so the
    # greedy picks the same tokens under either)
    angle = cos.clamp(-1, 1).acos()

    def spread(s):
        return min(float(angle[i, j]) for i, j in itertools.combinations(s, 2))
    best = max(spread(s) for s in itertools.combinations(range(9), 3))
    assert spread(picks) >= 0.5 * best - 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_kcenter_is_farthest_point_traversal(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 6, generator=g)
    dist = 1 - _cos(x)
    seed_token = int((dist.sum(0) / 29).argmax())
    assert _select("kcenter", _view(x), 8) == _naive_greedy(dist, 8, seed_token)


@pytest.mark.parametrize("seed", range(5))
def test_sads_rule(seed):
    g = torch.Generator().manual_seed(seed)
    x, s = torch.randn(30, 6, generator=g), torch.rand(30, generator=g) * 5
    picks = ops.sads(ops.on_demand(ops.unit_rows(x)), s, 8)
    norm = (s - s.min()) / (s.max() - s.min() + 1e-8)
    assert sorted(picks.tolist()) == _naive_greedy(1 - _cos(x), 8, int(s.argmax()), weight=norm)
    assert int(picks[0]) == int(s.argmax())


def test_ties_go_to_the_lowest_index():
    x = torch.eye(4).repeat(3, 1)  # 12 tokens, 4 distinct directions, each three times
    assert _select("kcenter", _view(x), 4) == [0, 1, 2, 3]
    assert _select("divprune", _view(x), 4) == [0, 1, 2, 3]
    assert _select("mmr", _view(x), 4, lam=0.0) == [0, 1, 2, 3]


# ---- ZO sensitivity --------------------------------------------------------------------------------------
def _linear_projector(w: torch.Tensor, n: int = 5, g: int = 1) -> ProjectorInput:
    x = torch.randn(n, g, w.shape[1] // g, generator=torch.Generator().manual_seed(1))
    return ProjectorInput(inputs=x, valid=torch.ones(n, dtype=torch.bool), project=lambda t: t.flatten(1) @ w.T)


def _directions(m: int, dim: int, seed: int = 0) -> torch.Tensor:
    return zoo.unit_directions(m, dim, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("g", [1, 4])  # g = 4: a Qwen-style 2x2 group flattened by the projector
def test_zo_sensitivity_of_a_linear_projector(g):
    w = torch.randn(12, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 16)
    u = _directions(20_000, 16)
    s = zoo.projector_sensitivity(_linear_projector(w, g=g), u, step=0.01)
    monte_carlo = (_directions(200_000, 16, seed=1) @ w.T).norm(dim=-1).mean()
    torch.testing.assert_close(s, monte_carlo.expand(5), rtol=0.01, atol=0)
    s2 = zoo.projector_sensitivity(_linear_projector(3 * w, g=g), u, step=0.01)
    torch.testing.assert_close(s2, 3 * s, rtol=1e-4, atol=0)


def test_zo_sensitivity_matches_per_token_central_differences(monkeypatch):
    monkeypatch.setattr(zoo, "CHUNK_ROWS", 10)  # several chunks
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 5))
    x = torch.randn(7, 1, 6)
    proj = ProjectorInput(inputs=x, valid=torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.bool),
                          project=lambda t: mlp(t[:, 0]))
    u, h = _directions(4, 6), 0.01
    s = zoo.projector_sensitivity(proj, u, h)
    with torch.no_grad():
        expect = torch.stack([torch.stack([(mlp(xi[0] + h * uj) - mlp(xi[0] - h * uj)).norm() / (2 * h)
                                           for uj in u]).mean() for xi in x])
    valid = proj.valid
    torch.testing.assert_close(s[valid], expect[valid], rtol=1e-5, atol=1e-6)
    assert s[2] == s[valid].min()  # no projector input: the smallest sensitivity


def test_low_rank_projector():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 10))
    x = torch.randn(9, 8)
    with torch.no_grad():
        ref = mlp(x)
        with zoo.LowRankLinears(10):  # no layer has a higher rank: unchanged
            torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-5)
        w1, w2 = (_truncated(layer.weight, 3) for layer in (mlp[0], mlp[2]))
        expect = nn.functional.gelu(x @ w1.T + mlp[0].bias) @ w2.T + mlp[2].bias
        with zoo.LowRankLinears(3):
            torch.testing.assert_close(mlp(x), expect, rtol=1e-5, atol=1e-5)


def test_rank_truncates_a_black_box_projector_in_clean_mode():
    """A projector without the MLP structure (Gemma 3's): ``rank`` truncates every layer in clean mode
    too, as in the reference mode; it used to be ignored there (the sensitivity stayed full-rank)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 10))
    proj = ProjectorInput(inputs=torch.randn(9, 1, 8), valid=torch.ones(9, dtype=torch.bool),
                          project=lambda t: mlp(t[:, 0]))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        full = zoo.ZOScorer(zoo.ZOOptions())({"projector": proj}, g())
        low = zoo.ZOScorer(zoo.ZOOptions(rank=3))({"projector": proj}, g())
        with zoo.LowRankLinears(3):
            expect = zoo.projector_sensitivity(proj, zoo.unit_directions(64, 8, g()), 0.01)
    torch.testing.assert_close(low, expect)
    assert not torch.allclose(low, full, rtol=1e-3, atol=0)  # negative control: truncation changes the values


def _truncated(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


# ---- the pruners on the tiny models --------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_budget_and_generate(family, name):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1, 2])
    for keep in (0.3, 5):
        with vtprune.apply(tv.model, name, keep=keep) as handle:
            out = tv.model.generate(**inputs, **GEN)
            stats = handle.stats
        assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + GEN["max_new_tokens"]
        assert stats.visual_after == [budget(keep, n) for n in stats.visual_before]
    if family not in ("llava", "gemma3"):  # gemma3: a fixed count per view without pan-and-scan
        assert len(set(stats.visual_before)) > 1  # ragged


@pytest.mark.parametrize("name,options", [("zoo", {}), ("zoo", {"rank": 8, "mode": "reference"}),
                                          ("mmr", {}), ("mmr", {"importance": "text"}),
                                          ("mmr", {"importance": "zoo"}), ("divprune", {}), ("kcenter", {})])
def test_cached_equals_uncached(name, options):
    tv = model("llava_next")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, name, keep=0.3, **options) as handle:
        c = tv.model.generate(**inputs, **GEN)
        kept = handle.stats.visual_after
        u = tv.model.generate(**inputs, **GEN, use_cache=False)
        assert handle.stats.visual_after == kept
    assert torch.equal(c.sequences, u.sequences)
    torch.testing.assert_close(torch.stack(c.logits, 1), torch.stack(u.logits, 1), atol=1e-5, rtol=1e-5)


@pytest.fixture
def recorded():
    """Register a probe pruner that records the views it is given (vision q/k of layer 0 captured)."""
    views: list[VisualView] = []

    class Probe(vtprune.Pruner):
        config_class = type("ProbeConfig", (vtprune.UniformConfig,), {"name": "_probe_div"})
        needs = frozenset({"vision_qk", "projector"})

        def vision_layers(self, full, n):
            return [0]

        def select(self, view, k):
            views.append(view)
            return vtprune.Selection(indices=torch.arange(k))

    vtprune.register_pruner(Probe)
    yield views
    del _REGISTRY["_probe_div"]


def test_anyres_view_labels_match_the_encoder_views(recorded):
    tv = model("llava_next")
    with vtprune.apply(tv.model, "_probe_div", keep=0.5):
        tv.model(**batch_inputs(tv, [0, 1, 2]))
    for view in recorded:
        labels, quirk = anyres_views(view.layout)
        expect = torch.full_like(labels, -1)
        for v, qk in enumerate(view.extras["vision_qk"][0]):
            t = qk.token_of_patch
            expect[t[t >= 0].cpu()] = v
        assert torch.equal(labels, expect)
        assert torch.equal(~view.extras["projector"].valid.cpu(), labels < 0)
        seg = view.layout.segments[1]
        assert torch.equal(quirk, torch.arange(seg.rows) * (seg.cols + 1) + seg.cols)


def test_zoo_reference_mode_on_llava_next(recorded):
    tv = model("llava_next")
    inputs = batch_inputs(tv, [0, 1, 2])
    with vtprune.apply(tv.model, "_probe_div", keep=0.5):
        tv.model(**inputs)
    config = make_config("zoo", keep=0.3, mode="reference")
    pruner = build_pruner(config)
    for view in recorded:
        labels, quirk = anyres_views(view.layout)
        views = int(labels.max()) + 1
        g2 = view.layout.segments[0].size
        k = min(view.num_tokens, (math.floor(5 * g2 * 0.3) // views) * views + quirk.numel())
        assert pruner.count(view.layout) == k
        kept = pruner.select(view, k).indices
        assert set(quirk.tolist()) <= set(kept.tolist())  # the un-offset "newline" indices (spec §1.6)
    with vtprune.apply(tv.model, "zoo", keep=0.3, mode="reference") as handle:
        tv.model(**inputs)
        assert handle.stats.visual_after == [pruner.count(v.layout) for v in recorded]


def test_reference_count_rules():
    flat = ImageLayout.flat(576)
    assert build_pruner(make_config("zoo", keep=0.1112, mode="reference")).count(flat) == 64  # ⌊ρV⌋
    assert build_pruner(make_config("zoo", keep=0.1112)).count(flat) == 64
    assert build_pruner(make_config("divprune", keep=0.098, mode="reference")).count(flat) == 56
    assert build_pruner(make_config("mmr", keep=0.25, mode="reference")).count(ImageLayout.flat(10)) == 2  # round
    assert build_pruner(make_config("mmr", keep=0.25)).count(ImageLayout.flat(10)) == 3  # half up


def test_zoo_directions_come_from_the_seeded_generator(recorded):
    tv = model("qwen2_5_vl")
    with vtprune.apply(tv.model, "_probe_div", keep=0.5):
        tv.model(**batch_inputs(tv, [0]))
    view = recorded[0]
    proj = view.extras["projector"]
    a, b, c = (build_pruner(make_config("zoo", keep=0.5, seed=seed)) for seed in (0, 0, 1))
    s = [p.scorer(view.extras, p.generator(view)) for p in (a, b, c)]
    assert torch.equal(s[0], s[1]) and not torch.equal(s[0], s[2])
    u = zoo.unit_directions(64, proj.inputs.shape[1] * proj.inputs.shape[2], a.generator(view))
    torch.testing.assert_close(s[0], zoo.projector_sensitivity(proj, u, 0.01))
    c.scorer.directions = u  # an injected bank replaces the draw
    torch.testing.assert_close(c.scorer(view.extras, c.generator(view)), s[0])


# ---- mmr importance options ---------------------------------------------------------------------------
def test_mmr_text_importance():
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    assert _select("mmr", _view(x, x[[3]] * 2), 1, importance="text", lam=1.0) == [3]
    text = torch.randn(4, 8)
    relevance = (ops.unit_rows(x) @ ops.unit_rows(text).T).mean(1)
    top = sorted(torch.topk(relevance, 5).indices.tolist())
    assert _select("mmr", _view(x, text), 5, importance="text", lam=1.0) == top


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])  # with and without a [CLS] token
@pytest.mark.parametrize("importance", ["cls", "pagerank"])
def test_mmr_attention_importance(importance, family):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "mmr", keep=0.3, importance=importance, lam=1.0) as handle:
        if importance == "cls":
            scorer = ops.cls_attention_scores
        else:
            scorer = functools.partial(pagerank_scores, config=handle.config)
        views, select = [], handle.pruner.select
        handle.pruner.select = lambda view, k: views.append((view, k)) or select(view, k)
        tv.model.generate(**inputs, **GEN)
        stats = handle.stats
        for view, k in views:  # λ = 1: the top-k of the attention scores
            top = torch.sort(torch.topk(scorer(view).float(), k).indices).values
            torch.testing.assert_close(select(view, k).indices, top)
    assert stats.visual_after == [budget(0.3, n) for n in stats.visual_before]


@pytest.mark.parametrize("options,field", [
    ({"importance": "attention"}, "importance"), ({"lam": 1.5}, "lam"), ({"scorer_path": "x.pt"}, "scorer_path"),
    ({"importance": "learned"}, "scorer_path"), ({"directions": 0}, "directions"), ({"step": 0.0}, "step"),
    ({"rank": 0}, "rank"), ({"mode": "exact"}, "mode"),
])
def test_invalid_options_name_the_field(options, field):
    with pytest.raises(VTPruneError, match=field):
        make_config("mmr", **options)


def test_zoo_acts_before_the_llm_only():
    with pytest.raises(VTPruneError, match="site"):
        vtprune.apply(model("llava").model, "zoo", keep=0.3, site="layer", layer=2)


def test_structured_mlp_sensitivity_equals_black_box_central_differences():
    """The shared-first-layer / SVD-last-layer estimator computes the same central differences."""
    from vtprune.capture import MLPProjector
    from vtprune.methods.zoo import (
        central_difference_sensitivity,
        mlp_sensitivity,
        output_factor,
        unit_directions,
    )

    proj = model("llava").model.model.multi_modal_projector
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 1, proj.linear_1.in_features, generator=g)
    u = unit_directions(16, x.shape[-1], g)
    mlp = MLPProjector(first=proj.linear_1, act=proj.act, last=proj.linear_2)
    with torch.no_grad():
        black_box = central_difference_sensitivity(x, lambda t: proj(t[:, 0]), u, 0.01)
        exact = mlp_sensitivity(x, mlp, u, 0.01, output_factor(proj.linear_2.weight, None))
        low = mlp_sensitivity(x, mlp, u, 0.01, output_factor(proj.linear_2.weight, 8))
    torch.testing.assert_close(exact, black_box, rtol=2e-3, atol=1e-5)
    assert bool((low <= exact + 1e-5).all()) and not torch.allclose(low, exact)  # truncation only removes energy


# per-patch LayerNorm, RMSNorm, LayerNorm; InternVL: one LayerNorm over the 4 patches together
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"])
def test_structured_sensitivity_of_a_norm_first_merger_equals_black_box_central_differences(family):
    """Qwen's PatchMerger normalises each of a token's 4 patch vectors before its MLP (InternVL's projector all of them
    at once): the structured estimator
    (per-vector norms from dot products, both linear layers shared) computes the black box's central differences;
    negative control: the same MLP without its norm gives other values (and the plain estimator computes those)."""
    from vtprune.capture import MLPProjector
    from vtprune.methods.zoo import central_difference_sensitivity, mlp_sensitivity, output_factor, unit_directions
    from vtprune.models import adapter_for

    adapter = adapter_for(model(family).model)
    mlp = adapter._mlp()
    assert mlp is not None and mlp.norm is not None
    g = torch.Generator().manual_seed(0)
    d = mlp.first.in_features // 4
    x = 3 * torch.randn(37, 4, d, generator=g) + 1  # off-centre and not unit-scaled: the norm matters
    u = unit_directions(16, 4 * d, g)
    factor = output_factor(mlp.last.weight, None)
    with torch.no_grad():
        black_box = central_difference_sensitivity(x, adapter._project, u, 0.01)
        structured = mlp_sensitivity(x, mlp, u, 0.01, factor)
        bare = mlp_sensitivity(x, MLPProjector(first=mlp.first, act=mlp.act, last=mlp.last), u, 0.01, factor)
        unnormed = central_difference_sensitivity(x, lambda t: mlp.last(mlp.act(mlp.first(t.flatten(1)))), u, 0.01)
    torch.testing.assert_close(structured, black_box, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(bare, unnormed, rtol=2e-3, atol=1e-5)  # without a norm: the concatenated inputs
    assert not torch.allclose(bare, black_box, rtol=2e-2)


def test_a_norm_that_does_not_tile_the_projector_input_is_refused():
    """A norm whose width does not divide a token's inputs (or a first layer over another width) gets a named error,
    not a silently mis-shaped estimate; a tiling one passes (negative control)."""
    from vtprune.capture import MLPProjector
    from vtprune.methods.zoo import NormedFirstLayer, unit_directions

    first, last = nn.Linear(12, 8), nn.Linear(8, 5)
    x, u = torch.randn(3, 4, 3), unit_directions(2, 12, torch.Generator().manual_seed(0))
    NormedFirstLayer(x, MLPProjector(first=first, act=nn.GELU(), last=last, norm=nn.LayerNorm(3)), u, 0.01)
    for norm in (nn.LayerNorm(5), nn.LayerNorm(24)):
        with pytest.raises(VTPruneError, match=r"projector norm over \d+ values and first layer over 12 inputs"):
            NormedFirstLayer(x, MLPProjector(first=first, act=nn.GELU(), last=last, norm=norm), u, 0.01)


def test_zoo_precision_sets_the_dtype_of_the_last_layer_product_only():
    """``precision="model"`` runs the structured estimator's product in the projector's dtype: a float32 model is
    unchanged bit for bit, a bf16 one rounds only that product (differences and norms stay float32)."""
    from vtprune.capture import MLPProjector, ProjectorInput
    from vtprune.methods.zoo import ZOOptions, ZOScorer

    proj = model("llava").model.model.multi_modal_projector
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 1, proj.linear_1.in_features, generator=g)

    def sensitivity(module, precision: str) -> torch.Tensor:
        mlp = MLPProjector(first=module.linear_1, act=module.act, last=module.linear_2)
        signal = ProjectorInput(inputs=x.to(module.linear_1.weight.dtype), project=lambda t: module(t[:, 0]),
                                valid=torch.ones(37, dtype=torch.bool), mlp=mlp)
        with torch.no_grad():
            return ZOScorer(ZOOptions(directions=16, precision=precision))(
                {"projector": signal}, torch.Generator().manual_seed(1))

    exact = sensitivity(proj, "float32")
    assert torch.equal(sensitivity(proj, "model"), exact)
    rounded = sensitivity(proj, "bfloat16")
    torch.testing.assert_close(rounded, exact, rtol=2e-2, atol=1e-4)
    assert not torch.equal(rounded, exact)  # negative control: the product really ran in bf16
    half = copy.deepcopy(proj).to(torch.bfloat16)
    assert torch.equal(sensitivity(half, "model"), sensitivity(half, "bfloat16"))
    assert not torch.equal(sensitivity(half, "model"), sensitivity(half, "float32"))
    with pytest.raises(VTPruneError, match="precision='fp8'"):
        make_config("zoo", keep=0.5, precision="fp8")
