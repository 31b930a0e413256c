"""Every registered pruner (default options, and ``mode="reference"`` where it has one) at budgets 1, V-1, V and 1.0
on each family, one forward each: it keeps exactly its budget (reference modes: their count rule) and never crashes;
where it keeps everything the output equals the unhooked model's bit for bit; ``select(view, V)`` keeps every token,
in order, with its own state. On LLaVA-NeXT also the budget G of grid tokens (V minus the row-newline tokens)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import batch_inputs, model

import vtprune
from vtprune.capture import HINTS
from vtprune.errors import VTPruneError
from vtprune.registry import pruner_class
from vtprune.testing import FAMILIES
from vtprune.view import budget

PRUNERS = [name for name in vtprune.list_pruners() if not name.startswith("_")]
VARIANTS = [pytest.param(name, {}, id=name) for name in PRUNERS] + [
    pytest.param(name, {"mode": "reference"}, id=f"{name}-reference")
    for name in PRUNERS if "mode" in pruner_class(name).config_class.field_names()]
BUDGETS = ("1", "V-1", "V", "1.0")
#: reference modes that renumber each layer group's positions (PyramidDrop, SparseVLM v1.5) refuse, by name, the
#: families without one 1-D rotary table and full attention everywhere
RENUMBERING = {"pyramiddrop", "sparsevlm"}
NOT_RENUMBERABLE = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3"}


@functools.cache
def _sample(family: str) -> tuple[dict, int, torch.Tensor]:
    """One prompt with one image: its inputs, its visual token count V and the unhooked model's logits."""
    tv = model(family)
    inputs = batch_inputs(tv, [0])
    v = int((inputs["input_ids"] == tv.model.config.image_token_id).sum())
    with torch.no_grad():
        return inputs, v, tv.model(**inputs).logits


def _pruned(family: str, pruner: str, **options) -> tuple[vtprune.PruneHandle, list, list]:
    """``apply`` on ``_sample(family)``'s model (with a hint per visual token for pruners that read hints) and the
    lists that the views its pruner selects from and the layouts it counts are appended to."""
    v = _sample(family)[1]
    handle = vtprune.apply(model(family).model, pruner, **options)
    if HINTS in handle.pruner.needs:
        handle.set_hints([{"token_priority": {"question": [i % 3 for i in range(v)]}}])
    views, layouts = [], []
    select, count = handle.pruner.select, handle.pruner.count
    handle.pruner.select = lambda view, k: views.append(view) or select(view, k)
    handle.pruner.count = lambda layout: layouts.append(layout) or count(layout)
    return handle, views, layouts


@pytest.mark.parametrize("keep_name", BUDGETS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruner,options", VARIANTS)
def test_budget_is_kept_and_keep_all_is_identity(pruner, options, family, keep_name):
    tv = model(family)
    inputs, v, ref = _sample(family)
    keep = {"1": 1, "V-1": v - 1, "V": v, "1.0": 1.0}[keep_name]
    if options and pruner in RENUMBERING and family in NOT_RENUMBERABLE:
        with pytest.raises(VTPruneError, match="renumbers each layer group's positions"):
            vtprune.apply(tv.model, pruner, keep=keep, **options)
        return
    handle, views, layouts = _pruned(family, pruner, keep=keep, **options)
    with handle:
        with torch.no_grad():
            logits = tv.model(**inputs).logits
        # reference count rule; a multi-cut schedule keeps what its last cut's rule leaves
        last = handle._engine.site.stages[-1].pruner if pruner in RENUMBERING else handle.pruner
        expected = budget(keep, v) if not options else min(last.count(layouts[0]), v)
        assert [tuple(image) for image in handle.stats.samples[0].images] == [(v, expected)]
        if keep_name == "V-1" and not options:
            everything = handle.pruner.select(views[0], v)
            assert torch.equal(everything.indices.cpu(), torch.arange(v))
            assert everything.embeddings is None or torch.equal(everything.embeddings, views[0].features)
    if expected == v:
        assert torch.equal(logits, ref)


@functools.cache
def _grid_tokens(family: str) -> int:
    """Visual tokens of ``_sample(family)``'s image that are part of a grid (LLaVA-NeXT newline tokens are not)."""
    handle, _, layouts = _pruned(family, "uniform", keep=1.0)
    with handle, torch.no_grad():
        model(family).model(**_sample(family)[0])
    return sum(idx.numel() for _, idx in layouts[0].grid_tokens())


@pytest.mark.parametrize("pruner", PRUNERS)
def test_llava_next_budget_of_all_grid_tokens(pruner):
    tv = model("llava_next")
    inputs, v, _ = _sample("llava_next")
    keep = _grid_tokens("llava_next")
    assert keep < v
    handle, _, _ = _pruned("llava_next", pruner, keep=keep)
    with handle, torch.no_grad():
        tv.model(**inputs)
        assert [tuple(image) for image in handle.stats.samples[0].images] == [(v, keep)]
