"""How to add a site (issue 16, docs/architecture.md): subclass ``Site`` (here the pre-LLM site, observed), register
it, let a method list it among its sites, and ``apply`` accepts ``site=<name>`` like a built-in one."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, model

import vtprune
from vtprune.methods.uniform import UniformConfig, UniformPruner
from vtprune.registry import _REGISTRY
from vtprune.sites import SITES, PreLLMSite, register_site


class ObservedPreLLMSite(PreLLMSite):
    """The pre-LLM site, counting the calls with images it prunes."""

    name = "_observed_pre_llm"
    title = "observed pre-LLM"
    calls = 0

    def images(self, kwargs, call) -> None:
        type(self).calls += 1
        super().images(kwargs, call)


class UniformAnywhereConfig(UniformConfig):
    name = "_uniform_anywhere"


class UniformAnywhere(UniformPruner):
    """``uniform``, also at the new site."""

    config_class = UniformAnywhereConfig
    sites = ("pre_llm", "_observed_pre_llm")


@pytest.fixture
def observed_site():
    register_site(ObservedPreLLMSite)
    vtprune.register_pruner(UniformAnywhere)
    ObservedPreLLMSite.calls = 0
    yield ObservedPreLLMSite
    del SITES["_observed_pre_llm"], _REGISTRY["_uniform_anywhere"]


def test_a_registered_site_runs_through_apply(observed_site):
    tv = model("llava")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "_uniform_anywhere", keep=0.3) as handle:
        ref = tv.model(**inputs).logits
        kept = handle.stats.visual_after
    with vtprune.apply(tv.model, "_uniform_anywhere", keep=0.3, site="_observed_pre_llm") as handle:
        got = tv.model(**inputs).logits
        assert handle.stats.visual_after == kept
    assert observed_site.calls == 1
    assert torch.equal(got, ref)
    with pytest.raises(vtprune.VTPruneError, match="not site='_observed_pre_llm'"):  # methods that do not list it
        vtprune.apply(tv.model, "uniform", keep=0.3, site="_observed_pre_llm")
