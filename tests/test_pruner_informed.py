"""The ``informed`` reference: it keeps the caller's highest priorities, breaks ties at random, and refuses to run
without hints or with hints of the wrong size."""

from __future__ import annotations

import pytest
import torch

import vtprune
from conftest import batch_inputs, model
from vtprune.view import ImageLayout, VisualView


def _view(priority: list[float] | None, v: int = 16) -> VisualView:
    objects = [0.0] * (v - 4) + [1.0] * 4
    hint = {"token_priority": {"question": priority, "objects": objects}}
    extras = {} if priority is None else {"hint": hint, "hint_image": 0}
    return VisualView(features=torch.randn(v, 8), text=torch.randn(3, 8), layout=ImageLayout.flat(v), site="pre_llm",
                      layer=None, sample=0, image=0, extras=extras)


def _pruner(**kw):
    from vtprune.registry import build_pruner, make_config
    return build_pruner(make_config("informed", keep=4, **kw))


def test_keeps_highest_priorities_then_random_tie_break():
    priority = [0.0] * 16
    for i in (3, 9):
        priority[i] = 2.0
    for i in (1, 5, 6, 12):
        priority[i] = 1.0
    picks = set()
    for seed in range(6):
        sel = _pruner(seed=seed).select(_view(priority), 4).indices.tolist()
        assert {3, 9} <= set(sel) and set(sel) <= {1, 3, 5, 6, 9, 12}
        assert sel == sorted(sel)
        picks.add(tuple(sel))
    assert len(picks) > 1  # the tie among the priority-1 tokens is broken by the seed


def test_key_selects_the_priority_entry():
    sel = _pruner(key="token_priority.objects").select(_view([5.0] * 4 + [0.0] * 12), 4).indices.tolist()
    assert sel == [12, 13, 14, 15]
    for key in ("other", "token_priority.other", "token_priority.question.x"):
        with pytest.raises(vtprune.VTPruneError, match=f"'{key}'"):
            _pruner(key=key).select(_view([0.0] * 16), 4)


def test_bad_hints_are_clear_errors():
    with pytest.raises(vtprune.VTPruneError, match="set_hints"):
        _pruner().select(_view(None), 4)
    with pytest.raises(vtprune.VTPruneError, match="one priority per visual token"):
        _pruner().select(_view([1.0] * 15), 4)
    with pytest.raises(vtprune.VTPruneError, match="key="):
        vtprune.InformedConfig(keep=4, key="")


def test_model_without_hints_fails_loudly():
    tv = model("llava")
    with vtprune.apply(tv.model, "informed", keep=2), pytest.raises(vtprune.VTPruneError, match="set_hints"):
        tv.model(**batch_inputs(tv, [0]))


def test_hints_reach_the_right_rows():
    """Row r's priorities pick exactly row r's kept tokens (k = number of priority-1 tokens)."""
    tv = model("llava")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "random", keep=1.0) as probe:
        tv.model(**inputs)
        sizes = [s.images[0][0] for s in probe.stats.samples]
    wanted = [[1, 4], [0, 2]]
    hints = [{"token_priority": {"question": [float(j in w) for j in range(v)]}} for w, v in zip(wanted, sizes)]
    with vtprune.apply(tv.model, "informed", keep=2) as handle:
        seen = []
        original = handle.pruner.select
        handle.pruner.select = lambda view, k: seen.append(original(view, k).indices.tolist()) or original(view, k)
        handle.set_hints(hints)
        tv.model(**inputs)
    assert seen == wanted


def test_hints_for_another_batch_size_are_refused():
    tv = model("llava")
    with vtprune.apply(tv.model, "informed", keep=2) as handle, \
            pytest.raises(vtprune.VTPruneError, match="1 hint\\(s\\) set for a batch of 2"):
        handle.set_hints([{"token_priority": {"question": [0.0] * 4}}])
        tv.model(**batch_inputs(tv, [0, 1]))
