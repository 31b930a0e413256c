"""How to add a method (issue 16): a score-then-top-k method is a ScorerPruner with one ``score()``; every
registered method documents itself in docs/algorithms.md and gives its selection cost in ``overhead_flops``."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import batch_inputs, model

import vtprune
from vtprune.methods.base import Pruner
from vtprune.registry import _REGISTRY, pruner_aliases, pruner_class
from vtprune.view import budget

ALGORITHMS = Path(__file__).resolve().parents[1] / "docs" / "algorithms.md"


@dataclass
class FirstChannelConfig(vtprune.PrunerConfig):
    """Keep the tokens with the largest first feature channel."""

    name = "_first_channel"


class FirstChannelPruner(vtprune.ScorerPruner):
    """The whole method: one score per token; the base keeps the k best in original order."""

    config_class = FirstChannelConfig

    def score(self, view: vtprune.VisualView) -> torch.Tensor:
        return view.features[:, 0].float()

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> int:
        return 0


@pytest.fixture
def first_channel(monkeypatch):
    """The method registered, with every (view, k, selection) the engine asked of it recorded."""
    vtprune.register_pruner(FirstChannelPruner)
    seen = []
    select = FirstChannelPruner.select
    monkeypatch.setattr(FirstChannelPruner, "select",
                        lambda self, view, k: seen.append((view, k, select(self, view, k))) or seen[-1][2])
    yield seen
    del _REGISTRY["_first_channel"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_scorer_pruner_keeps_its_budget_and_the_hand_computed_top_k(family, first_channel):
    tv = model(family)
    keep = 0.3
    with vtprune.apply(tv.model, "_first_channel", keep=keep) as handle:
        tv.model(**batch_inputs(tv, [0, 1]))
        stats = handle.stats
    assert stats.visual_after == [budget(keep, n) for n in stats.visual_before]
    assert len(first_channel) == 2
    for view, k, sel in first_channel:
        assert k == budget(keep, view.num_tokens)
        column = view.features[:, 0].float().tolist()
        by_hand = sorted(sorted(range(len(column)), key=lambda i: (-column[i], i))[:k])
        assert sel.indices.tolist() == by_hand


@pytest.mark.parametrize("name", vtprune.list_pruners())
def test_every_method_has_overhead_flops_and_points_at_its_algorithm_section(name):
    cls = pruner_class(name)
    if name.startswith("_"):
        pytest.skip("a test's own pruner")
    own = next(c for c in cls.__mro__ if "overhead_flops" in c.__dict__)
    assert own is not Pruner, f"{cls.__name__} inherits Pruner.overhead_flops: give its own formula (or None)"
    cost = cls.overhead_flops(576, 64, 4096)
    assert cost is None or (isinstance(cost, int) and cost >= 0)
    assert cls.overhead_flops.__doc__, f"{cls.__name__}.overhead_flops must document its formula"
    assert "docs/algorithms.md" in (cls.__doc__ or ""), f"{cls.__name__}'s docstring must point at docs/algorithms.md"
    if ALGORITHMS.exists():
        headings = [re.sub(r"[^a-z0-9]", "", h.lower()) for h in re.findall(r"^## (.+)$", ALGORITHMS.read_text(), re.M)]
        assert any(re.sub(r"[^a-z0-9]", "", name) in h for h in headings), f"no '## {name}' section in {ALGORITHMS}"


def test_aliases_resolve_to_the_method_and_are_not_listed():
    assert pruner_aliases() == {"pagerank": "zero_tprune"}
    assert pruner_class("pagerank") is pruner_class("zero_tprune")
    assert "pagerank" not in vtprune.list_pruners()
    assert vtprune.PagerankConfig is vtprune.ZeroTPruneConfig


def test_deprecated_module_paths_still_import(monkeypatch):
    for module in [m for m in sys.modules if m in ("vtprune.selectors", "vtprune.pruners")
                   or m.startswith("vtprune.pruners.")]:
        monkeypatch.delitem(sys.modules, module)
    with pytest.warns(DeprecationWarning):
        from vtprune.selectors import top_k  # noqa: F401
    with pytest.warns(DeprecationWarning):
        from vtprune.pruners.pagerank import PagerankConfig
    assert PagerankConfig is vtprune.ZeroTPruneConfig
