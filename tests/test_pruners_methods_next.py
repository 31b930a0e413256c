"""Issue 19's methods that need no engine change: the FastV / random reference count rule, IDPruner's
``parallel_k``, VisPruner and CDPruner. Each rule is checked against a plain re-implementation written here,
the DPP's greedy MAP also against brute force where greedy is provably optimal. Keep-all identity, exact budgets,
cached == uncached and batch == single for every family are in test_pruners_all.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import GEN, batch_inputs, model

import vtprune
from vtprune import ops
from vtprune.errors import VTPruneError
from vtprune.methods.cdpruner import (
    CDPrunerPruner,
    conditional_kernel,
    dpp_greedy_map,
    instruction_relevance,
)
from vtprune.methods.vispruner import VisPrunerPruner, remove_duplicates
from vtprune.registry import _REGISTRY, build_pruner, make_config
from vtprune.view import ImageLayout, VisualView, budget


def _view(features: torch.Tensor, text: torch.Tensor | None = None) -> VisualView:
    text = torch.zeros(0, features.shape[1]) if text is None else text
    return VisualView(features=features, text=text, layout=ImageLayout.flat(features.shape[0]), site="pre_llm",
                      layer=None, sample=0, image=0)


def _count(name: str, keep, size: int, **options) -> int:
    return build_pruner(make_config(name, keep=keep, **options)).count(ImageLayout.flat(size))


# ---- FastV / random: the reference count rule -------------------------------------------------------------
@pytest.mark.parametrize("name", ["fastv", "random"])
@pytest.mark.parametrize("keep,size,reference,clean", [
    (0.5, 25, 12, 13),     # 12.5: half to even in the reference, half up in clean
    (0.5, 27, 14, 14),     # 13.5 -> 14 in both
    (0.25, 10, 2, 3),      # 2.5
    (0.25, 576, 144, 144),
    (0.75, 2, 2, 2),       # 1.5 -> 2 in both
    (0.1, 3, 1, 1),        # round(0.3) = 0: at least one token
    (7, 25, 7, 7),         # an int keep is a count in both modes
    (40, 25, 25, 25),
])
def test_reference_count_rule_is_python_round(name, keep, size, reference, clean):
    assert _count(name, keep, size, mode="reference") == reference
    assert _count(name, keep, size) == clean == budget(keep, size)


@pytest.mark.parametrize("name", ["fastv", "random"])
def test_reference_counts_on_a_model(name):
    tv = model("llava")  # 16 visual tokens; 16 · 0.40625 = 6.5 exactly
    inputs = batch_inputs(tv, [0, 1])
    for mode, kept in (("reference", 6), ("clean", 7)):
        with vtprune.apply(tv.model, name, keep=0.40625, mode=mode) as handle:
            seq_c = tv.model.generate(**inputs, **GEN).sequences
            assert handle.stats.visual_after == [kept, kept]
            seq_u = tv.model.generate(**inputs, **GEN, use_cache=False).sequences
        assert torch.equal(seq_c, seq_u)


@pytest.mark.parametrize("name", ["fastv", "random", "vispruner", "cdpruner"])
def test_mode_is_validated(name):
    with pytest.raises(VTPruneError, match="mode="):
        make_config(name, mode="exact")


# ---- IDPruner parallel_k ----------------------------------------------------------------------------------
def _naive_parallel_mmr(x: torch.Tensor, imp: torch.Tensor, k: int, lam: float, p: int) -> list[int]:
    """The reference's loop, written plainly: μ starts at -2; each step scores the unpicked tokens (importance
    alone in the first step), takes the best min(p, k - picked) (lowest index on ties), then raises μ by the
    new picks' cosines."""
    cos = ops.unit_rows(x) @ ops.unit_rows(x).T
    mu = [-2.0] * len(imp)
    picked: list[int] = []
    while len(picked) < k:
        def score(i):
            return float(imp[i]) if not picked else lam * float(imp[i]) - (1 - lam) * mu[i]
        order = sorted((i for i in range(len(imp)) if i not in picked), key=lambda i: (-score(i), i))
        block = order[:min(p, k - len(picked))]
        picked += block
        for i in range(len(imp)):
            mu[i] = max([mu[i]] + [float(cos[i, j]) for j in block])
    return sorted(picked)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p", [1, 2, 3, 5, 40])
def test_parallel_k_follows_the_reference_loop(seed, p):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 6, generator=g) * torch.rand(30, 1, generator=g)
    imp = ops.min_max(x.norm(dim=-1), eps=1e-6)
    for k in (1, 7, 12):
        got = build_pruner(make_config("mmr", keep=k, parallel_k=p)).select(_view(x), k).indices.tolist()
        assert got == _naive_parallel_mmr(x, imp, k, 0.5, p)


def test_parallel_k_1_is_the_one_pick_loop_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 8, generator=g)
    imp = ops.min_max(x.norm(dim=-1), eps=1e-6)
    column = ops.on_demand(ops.unit_rows(x))
    lam = 0.3
    one = ops.greedy(column, 50, 11, imp.argmax(), lambda maxsim: lam * imp - (1 - lam) * maxsim, "cpu")
    assert torch.equal(ops.mmr(column, imp, 11, 0.3), one)  # pick order included
    assert torch.equal(ops.mmr(column, imp, 11, 0.3, per_step=1), one)
    default = build_pruner(make_config("mmr", keep=11, lam=0.3)).select(_view(x), 11).indices
    assert torch.equal(build_pruner(make_config("mmr", keep=11, lam=0.3, parallel_k=1)).select(_view(x), 11).indices,
                       default)


def test_parallel_k_extremes():
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    top = sorted(torch.topk(x.norm(dim=-1), 6).indices.tolist())
    # one step takes the k most important tokens; λ = 1 ignores redundancy at any step size
    assert build_pruner(make_config("mmr", keep=6, parallel_k=6)).select(_view(x), 6).indices.tolist() == top
    assert build_pruner(make_config("mmr", keep=6, parallel_k=4, lam=1.0)).select(_view(x), 6).indices.tolist() == top


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_parallel_k_is_validated(value):
    with pytest.raises(VTPruneError, match="parallel_k"):
        make_config("mmr", parallel_k=value)


# ---- VisPruner --------------------------------------------------------------------------------------------
def _naive_dedup(unit: torch.Tensor, residual: list[int], target: int) -> list[int]:
    """The duplicate-removal rule written plainly on Python lists."""
    if target == 0:
        return []
    while min(8, len(residual) - target) > 0:
        r = min(8, len(residual) - target)
        a, b = residual[0::2], residual[1::2]
        score = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        order = sorted(range(len(a)), key=lambda t: (-score[t], t))  # stable: earlier place first on ties
        residual = [a[t] for t in order[r:]] + b
    return residual


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [1, 3, 10, 29, 40])
def test_duplicate_removal_follows_the_rule(seed, target):
    g = torch.Generator().manual_seed(seed)
    unit = ops.unit_rows(torch.randn(40, 6, generator=g))
    residual = torch.randperm(40, generator=g)
    got = remove_duplicates(unit, residual, target).tolist()
    assert got == _naive_dedup(unit, residual.tolist(), target)
    assert len(got) == target and len(set(got)) == target


def test_duplicate_removal_drops_exact_copies_first():
    unit = torch.eye(6)[[0, 0, 1, 2, 3, 3, 4, 5]]  # tokens 0/1 and 4/5 are copies, in a/b places
    assert sorted(remove_duplicates(unit, torch.arange(8), 6).tolist()) == [1, 2, 3, 5, 6, 7]
    assert remove_duplicates(unit, torch.arange(8), 0).numel() == 0


@pytest.fixture
def vispruner_probe():
    """VisPruner registered under a test name, recording (view, k, selection)."""
    seen = []

    class Probe(VisPrunerPruner):
        config_class = type("ProbeConfig", (VisPrunerPruner.config_class,), {"name": "_probe_vispruner"})

        def select(self, view, k):
            sel = super().select(view, k)
            seen.append((view, k, sel))
            return sel

    vtprune.register_pruner(Probe)
    yield seen
    del _REGISTRY["_probe_vispruner"]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])  # [CLS]; + newline tokens; no [CLS]
@pytest.mark.parametrize("important", [0.0, 0.5, 1.0])
def test_vispruner_important_plus_diverse(family, important, vispruner_probe):
    tv = model(family)
    with vtprune.apply(tv.model, "_probe_vispruner", keep=0.3, important=important) as handle:
        tv.model(**batch_inputs(tv, [0, 1]))
        stats = handle.stats
    assert stats.visual_after == [budget(0.3, n) for n in stats.visual_before]
    for view, k, sel in vispruner_probe:
        proj = view.extras["projector"]
        scores = ops.cls_attention_scores(view).detach().masked_fill(~proj.valid, -math.inf)
        ranked = sorted(range(view.num_tokens), key=lambda i: (-float(scores[i]), i))[:int(proj.valid.sum())]
        k_imp = int(k * important)
        unit = ops.unit_rows(proj.inputs.detach().flatten(1))
        expect = sorted(ranked[:k_imp] + _naive_dedup(unit, ranked[k_imp:], k - k_imp))
        assert sel.indices.tolist() == expect
        assert bool(proj.valid[sel.indices].all())  # newline tokens only when k exceeds the featured tokens
        if important == 1.0:
            assert sel.indices.tolist() == ops.top_k(scores, k).indices.tolist()


def test_vispruner_options_and_reference_mode():
    with pytest.raises(VTPruneError, match="important="):
        make_config("vispruner", important=1.5)
    with pytest.raises(VTPruneError, match="site"):
        make_config("vispruner", site="layer", layer=2)
    tv = model("llava_next")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "vispruner", keep=0.3, mode="reference", important=0.75) as handle:
        seq_c = tv.model.generate(**inputs, **GEN).sequences
        assert handle.stats.visual_after == [budget(0.3, n) for n in handle.stats.visual_before]
        seq_u = tv.model.generate(**inputs, **GEN, use_cache=False).sequences
    assert torch.equal(seq_c, seq_u)


# ---- CDPruner: greedy MAP ---------------------------------------------------------------------------------
def _naive_greedy_map(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by determinants: each step adds the token maximising det L_{P ∪ i} (float64, lowest index on
    ties)."""
    kernel = kernel.double()
    picks: list[int] = []
    for _ in range(k):
        best, arg = -math.inf, -1
        for i in range(kernel.shape[0]):
            if i in picks:
                continue
            s = picks + [i]
            det = float(torch.linalg.det(kernel[s][:, s]))
            if det > best:
                best, arg = det, i
        picks.append(arg)
    return picks


def _brute_force_map(kernel: torch.Tensor, k: int) -> float:
    kernel = kernel.double()
    return max(float(torch.linalg.det(kernel[list(s)][:, list(s)]))
               for s in itertools.combinations(range(kernel.shape[0]), k))


def _det(kernel: torch.Tensor, subset) -> float:
    s = list(subset)
    return float(torch.linalg.det(kernel.double()[s][:, s]))


@pytest.mark.parametrize("seed", range(8))
def test_greedy_map_equals_the_determinant_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 12, generator=g, dtype=torch.float64)
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.2
    kernel = conditional_kernel(ops.unit_rows(x, torch.float64), w, None)
    for k in (1, 3, 6):
        assert dpp_greedy_map(kernel, k).tolist() == _naive_greedy_map(kernel, k)  # pick order too
        assert dpp_greedy_map(kernel, k, fallback=w).tolist() == _naive_greedy_map(kernel, k)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_map_is_optimal_where_greedy_provably_is(seed):
    """Orthogonal directions, each held by 1-3 tokens of different relevance: det L_P = Π w_i² when P holds
    distinct directions, else 0, so the optimum takes the most relevant copy of the best directions — which
    greedy does. k = 1 is optimal on any kernel."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randint(0, 5, (10,), generator=g)
    directions[:5] = torch.arange(5)
    x = torch.eye(5)[directions]
    w = torch.rand(10, generator=g) + 0.1
    kernel = conditional_kernel(ops.unit_rows(x), w, None)
    for k in range(1, 6):
        picks = dpp_greedy_map(kernel, k, fallback=w).tolist()
        assert len(set(directions[picks].tolist())) == k  # never two copies
        assert _det(kernel, picks) == pytest.approx(_brute_force_map(kernel, k), rel=1e-5)
    dense = conditional_kernel(ops.unit_rows(torch.randn(8, 3, generator=g)), w[:8], 0.5)
    assert _det(dense, dpp_greedy_map(dense, 1).tolist()) == pytest.approx(_brute_force_map(dense, 1))


def test_rank_exhausted_kernel_keeps_unique_picks():
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))  # rank 2
    w = torch.linspace(0.1, 1.0, 8)
    kernel = conditional_kernel(ops.unit_rows(x), w, None)
    clean = dpp_greedy_map(kernel, 6, fallback=w).tolist()
    assert clean[:2] == _naive_greedy_map(kernel, 2)
    rest = [i for i in sorted(range(8), key=lambda i: -float(w[i])) if i not in clean[:2]]
    assert clean[2:] == rest[:4]  # then by relevance
    raw = dpp_greedy_map(kernel, 6).tolist()  # the reference's arithmetic
    assert len(set(raw)) == 6 and raw[:2] == clean[:2]


# ---- CDPruner: relevance conditioning ---------------------------------------------------------------------
def test_instruction_relevance_normalisation():
    x = torch.eye(3)
    text = torch.tensor([[1.0, 0.5, 0.0]])  # cosines 1/√1.25, 0.5/√1.25, 0
    cos = torch.tensor([1.0, 0.5, 0.0]) / math.sqrt(1.25)
    clean = (cos - 0) / (cos.max() + 1e-6)
    torch.testing.assert_close(instruction_relevance(x, text, reference=False), clean)
    neg = -cos
    ref = (neg - neg.min() + 1e-6) / (neg.max() - neg.min())
    torch.testing.assert_close(instruction_relevance(x, text, reference=True), ref)
    assert torch.equal(instruction_relevance(x, text[:0], reference=False), torch.ones(3))  # no text: plain DPP
    assert torch.equal(instruction_relevance(x, torch.ones(1, 3), reference=True), torch.ones(3))  # constant


def _cd_select(x, text, k, **options) -> list[int]:
    return CDPrunerPruner(make_config("cdpruner", keep=k, **options)).select(_view(x, text), k).indices.tolist()


@pytest.mark.parametrize("target", [0, 4, 7])
def test_relevance_steers_the_selection(target):
    x = torch.eye(8)  # orthogonal tokens: diversity alone cannot choose
    text = x[[target]] + 0.1 * torch.ones(1, 8)
    assert _cd_select(x, text, 1) == [target]  # clean: the token most similar to the instruction
    assert _cd_select(x, text, 1, mode="reference") != [target]  # the reference negates the cosine
    others = [i for i in range(8) if i != target]
    assert _cd_select(x, text, 3) == sorted([target, *others[:2]])  # then ties: the lowest indices


def test_theta_zero_ignores_the_instruction_and_duplicates_are_avoided():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 16, generator=g)
    x = torch.cat([base, base[:3]])  # tokens 5..7 copy tokens 0..2
    texts = [torch.randn(3, 16, generator=g) for _ in range(3)]
    picks = {tuple(_cd_select(x, t, 4, theta=0.0)) for t in texts}
    assert len(picks) == 1  # θ = 0: a plain DPP on the similarity
    for t in texts:  # with relevance: never two copies of one token while distinct ones remain
        kept = _cd_select(x, t, 5)
        assert len({i if i < 5 else i - 5 for i in kept}) == 5


def test_cdpruner_options():
    with pytest.raises(VTPruneError, match="theta="):
        make_config("cdpruner", theta=1.0)
    assert make_config("cdpruner", theta=0.3).theta == 0.3


@pytest.mark.parametrize("family,options", [("llava_next", {"mode": "reference"}),
                                            ("qwen2_vl", {"site": "layer", "layer": 2, "theta": 0.8})])
def test_cdpruner_other_modes_generate_consistently(family, options):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "cdpruner", keep=0.3, **options) as handle:
        out_c = tv.model.generate(**inputs, **GEN)
        assert handle.stats.visual_after == [budget(0.3, n) for n in handle.stats.visual_before]
        out_u = tv.model.generate(**inputs, **GEN, use_cache=False)
    assert torch.equal(out_c.sequences, out_u.sequences)
    torch.testing.assert_close(torch.stack(out_c.logits, 1), torch.stack(out_u.logits, 1), atol=1e-5, rtol=1e-5)
