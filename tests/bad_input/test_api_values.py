"""Adversarial API values: every option of every registered pruner with wrong types and values is refused with a
:class:`VTPruneError` naming the option; unsupported sites name the site; applied configs cannot be changed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from conftest import batch_inputs, model

import vtprune
from vtprune import VTPruneError
from vtprune.registry import pruner_class
from vtprune.view import budget

PRUNERS = [name for name in vtprune.list_pruners() if not name.startswith("_")]
NAN, INF = math.nan, math.inf

#: option -> (bad value, the other options it needs to be read at all)
BAD: dict[str, list[tuple[Any, dict[str, Any]]]] = {
    "keep": [(v, {}) for v in ("0.5", True, None, [0.5], 0, -5, 0.0, -0.5, 1.5, NAN, INF, torch.tensor(0.5))],
    "site": [(v, {}) for v in ("llm", None, 3, ["pre_llm"])],
    "layer": [(v, {"site": "layer"}) for v in (0, -1, 2.5, "2", True)] + [(2, {"site": "pre_llm"})],
    "positions": [(v, {}) for v in ("shuffled", None, 0)] + [("compact", {"site": "layer", "layer": 2})],
    "seed": [(v, {}) for v in (1.5, "1", True, None, 2**64, -2**63 - 1)],
    "mode": [(v, {}) for v in ("exact", None, 1)],
    "image_pivots": [(v, {}) for v in (-1, 1.5, True, "4", None)] + [(0, {"text_pivots": 0})],
    "text_pivots": [(v, {}) for v in (-1, 1.5, True, "4", None)],
    "key": [(v, {}) for v in ("", 5, None)],
    "importance": [(v, {}) for v in ("attention", 5, None)],
    "lam": [(v, {}) for v in (-0.1, 1.5, NAN, "0.5", True, None)],
    "scorer_path": [("x.pt", {}), ("no/such/scorer.safetensors", {"importance": "learned"}),
                    (5, {"importance": "learned"}), (["x.pt"], {"importance": "learned"})],
    "trust_scorer_code": [(v, {}) for v in ("yes", 1, None)] + [(True, {})],
    "directions": [(v, {}) for v in (0, 1.5, True, "64", None)],
    "step": [(v, {}) for v in (0, -0.01, INF, NAN, "0.01", True, None)],
    "rank": [(v, {}) for v in (0, 1.5, True, "128")],
    "precision": [(v, {}) for v in ("fp8", "bf16", "", None, 16, ["model"])] + [("float32", {"mode": "reference"})],
    "wpr_iters": [(v, {}) for v in (0, 1.5, True, "1")],
    "wpr_tol": [(v, {}) for v in (-1.0, NAN, "0", True, None)],
    "head_variance": [(v, {}) for v in (5, (1,), (0.7, 0.1), ("a", "b"), (-1, 1), (NAN, 1), (True, 1))],
    "similarity_share": [(v, {}) for v in (1.5, -0.1, NAN, True, "0.5", None)],
    "vit_blocks": [(v, {}) for v in (5, (), (-1,), (1.5,), "ab", (True,))],
    "contextual": [(v, {}) for v in (1.0, -0.1, NAN, True, "0.1", None)],
    "start_layer": [(v, {}) for v in (1.5, "0", True, None)],
    "parallel_k": [(v, {}) for v in (0, -1, 1.5, True, "2", None)],
    "important": [(v, {}) for v in (1.5, -0.1, NAN, True, "0.5", None)],
    "theta": [(v, {}) for v in (1.0, -0.1, NAN, INF, True, "0.5")],
    "merge": [(v, {}) for v in ("average", None, 1, True)],
    "schedule": [(v, {}) for v in ("2:0.5", [], [(2, 0.25), (1, 0.1)], [(2, 0.25), (3, 0.5)], [(2, 0.5, 1)],
                                   [(1, 0.5), (2, 3)], [(1, True)])],
    "layers": [(v, {}) for v in ((), (3, 2), (0, 1), "8,16", (1.5,), (True,))],
    "recycle": [(v, {}) for v in ("yes", 1, None)],
    "segments": [(v, {}) for v in (0, -1, 1.5, True, "8", None)],
    "tau": [(v, {}) for v in (1.5, -1.5, NAN, INF, True, "0.9", None)],
    "anchor_every": [(v, {}) for v in (0, -1, 1.5, True, "4", None)],
    "beta": [(v, {}) for v in (-0.1, 1.5, NAN, True, "0.6", None)],
    "per_frame": [(v, {}) for v in (1, 0, "yes", None, 1.0)],
    "saliency": [(v, {}) for v in ("attention", 5, None)],
}
CASES = [pytest.param(name, field, value, extra, id=f"{name}-{field}={value!r}")
         for name in PRUNERS for field in pruner_class(name).config_class.field_names()
         for value, extra in BAD.get(field, [])]


def test_every_option_has_bad_values():
    """A new option must come with its adversarial cases here."""
    fields = {f for name in PRUNERS for f in pruner_class(name).config_class.field_names()}
    assert sorted(fields - set(BAD)) == []


@pytest.mark.parametrize("name,field,value,extra", CASES)
def test_bad_option_value_names_the_option(name, field, value, extra):
    with pytest.raises(VTPruneError, match=rf"\b{field}\b"):
        vtprune.apply(model("llava").model, name, **{**extra, field: value}).remove()


@pytest.mark.parametrize("name", PRUNERS)
def test_unknown_option_and_options_beside_a_config_object(name):
    tv = model("llava")
    with pytest.raises(VTPruneError, match=r"unknown option\(s\) \['kep'\]"):
        vtprune.apply(tv.model, name, kep=0.5).remove()
    with pytest.raises(VTPruneError, match="together with a config object"):
        vtprune.apply(tv.model, pruner_class(name).config_class(), keep=0.5).remove()


@pytest.mark.parametrize("pruner", [5, None, b"pool", vtprune.PoolConfig, ["pool"]])
def test_pruner_of_the_wrong_type(pruner):
    with pytest.raises(VTPruneError, match="unknown pruner"):
        vtprune.apply(model("llava").model, pruner, keep=0.5).remove()


@pytest.mark.parametrize("name,site,other", [("dart", "pre_llm", "in-LLM"), ("fastv", "pre_llm", "in-LLM"),
                                             ("zoo", "layer", "pre-LLM"), ("visionzip", "layer", "pre-LLM")])
def test_unsupported_site_names_the_supported_one(name, site, other):
    tv = model("llava")
    message = f"{name!r} supports only the {other} site"
    with pytest.raises(VTPruneError, match=message) as by_name:
        vtprune.apply(tv.model, name, site=site).remove()
    with pytest.raises(VTPruneError, match=message) as by_config:
        vtprune.apply(tv.model, pruner_class(name).config_class(site=site)).remove()
    assert "layer=" not in str(by_name.value) + str(by_config.value)


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1, -2**63])
def test_seed_range_is_what_torch_generators_accept(seed):
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, "random", keep=0.5, seed=seed) as handle:
        tv.model(**inputs)
        assert handle.stats.visual_after == [budget(0.5, handle.stats.visual_before[0])]


def test_applied_config_is_frozen_and_the_given_one_stays_free():
    tv = model("llava")
    inputs = batch_inputs(tv, [0])
    given = vtprune.PoolConfig(keep=0.5)
    with vtprune.apply(tv.model, given) as handle:
        for field, value in (("keep", -5), ("keep", 0.25), ("site", "layer")):
            with pytest.raises(VTPruneError, match=rf"{field}.*frozen.*dataclasses.replace"):
                setattr(handle.config, field, value)
        given.keep = -5  # the handle holds its own copy
        tv.model(**inputs)
        assert handle.stats.visual_after == [budget(0.5, handle.stats.visual_before[0])]
        again = dataclasses.replace(handle.config, keep=3)
        assert again.keep == 3 and handle.config.keep == 0.5
    with pytest.raises(VTPruneError, match="keep=-5"):
        vtprune.apply(tv.model, given).remove()


@pytest.mark.parametrize("hints", [5, "abc", {"token_priority": {}}, torch.ones(2)])
def test_hints_must_be_one_per_batch_row(hints):
    with vtprune.apply(model("llava").model, "informed", keep=0.5) as handle, \
            pytest.raises(VTPruneError, match="set_hints.*one hint per batch row"):
        handle.set_hints(hints)
