"""Model families (issue 16): how to add one, and the family list existing once, in ``vtprune.models``.

Adding a family is writing a ``ModelAdapter`` subclass and registering it; here a toy family (LLaVA's
adapter for a renamed model class) is registered inside a test, and ``vtprune.apply`` then accepts and
prunes that model exactly. Everything else that needs the families iterates the registry.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
import torch
from conftest import batch_inputs, model
from transformers import LlavaForConditionalGeneration

import vtprune
from vtprune import benchmark, flops, lmms_plugin, models, testing
from vtprune.errors import VTPruneError
from vtprune.harness.schema import ModelSpec
from vtprune.models import FAMILIES, LlavaAdapter, adapter_for, family_class, register_family

REPO = Path(__file__).resolve().parent.parent


class ToyVLMForConditionalGeneration(LlavaForConditionalGeneration):
    """A "new" model class: LLaVA's architecture under another name."""


class ToyAdapter(LlavaAdapter):
    """The toy family: LLaVA's token layout, positions and signals, for the renamed class."""

    family = "toy_vlm"
    model_classes = ("ToyVLMForConditionalGeneration",)
    located: typing.ClassVar[list[int]] = []

    def locate_images(self, inputs: dict) -> models.ImageSpans | None:
        spans = super().locate_images(inputs)
        self.located.append(0 if spans is None else len(spans))
        return spans


@pytest.fixture
def toy_family(monkeypatch) -> type[ToyAdapter]:
    """The toy family registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    ToyAdapter.located.clear()
    return register_family(ToyAdapter)


def _toy_model() -> torch.nn.Module:
    """The tiny LLaVA's weights in the toy class."""
    llava = model("llava").model
    toy = ToyVLMForConditionalGeneration(llava.config).eval()
    toy.load_state_dict(llava.state_dict())
    return toy


def test_a_registered_family_is_pruned_exactly(toy_family):
    toy, llava = _toy_model(), model("llava")
    inputs = batch_inputs(llava, [0, 1])
    assert type(adapter_for(toy)) is ToyAdapter and type(adapter_for(llava.model)) is LlavaAdapter
    assert "ToyVLMForConditionalGeneration" in vtprune.supported_models()
    with torch.no_grad():
        plain = toy(**inputs).logits
        with vtprune.apply(toy, "random", keep=10_000):  # every token kept, the pruner runs
            assert torch.equal(toy(**inputs).logits, plain)
        with vtprune.apply(llava.model, "uniform", keep=4):
            expected = llava.model(**inputs).logits
        with vtprune.apply(toy, "uniform", keep=4) as handle:
            pruned = toy(**inputs).logits
            assert handle.stats.visual_after == [4, 4]
    assert ToyAdapter.located == [2, 2]  # the toy family's adapter located both images of both calls
    assert torch.equal(pruned, expected)


def test_an_unregistered_model_class_is_refused_by_name():
    class OtherForConditionalGeneration(torch.nn.Module):
        pass

    with pytest.raises(VTPruneError, match="unsupported model OtherForConditionalGeneration"):
        adapter_for(OtherForConditionalGeneration())
    with pytest.raises(VTPruneError, match="unknown model family 'toy_vlm'"):
        family_class("toy_vlm")


def test_the_family_list_exists_once():
    assert FAMILIES == ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl", "qwen3_5", "llava_onevision",
                        "qwen3_vl", "gemma3")
    assert FAMILIES == tuple(models._REGISTRY)
    assert all(family_class(f).family == f for f in FAMILIES)
    assert vtprune.supported_models() == [c for f in FAMILIES for c in family_class(f).model_classes]
    # everything else reads the registry
    assert testing.FAMILIES is FAMILIES
    assert typing.get_args(ModelSpec.model_fields["tiny"].annotation)[0] == typing.Literal[FAMILIES]
    with pytest.raises(VTPruneError, match=re.escape(f"supported: {FAMILIES}")):
        flops.vision_flops(model("llava").model.config.text_config, flops.VisionWork(views=1))
    assert set(lmms_plugin.MODELS) == {family_class(f).lmms.model_id for f in FAMILIES}
    # every shipped real-size config belongs to the family that names it
    shipped = {p.stem: json.loads(p.read_text())["model_type"] for p in (REPO / "configs" / "models").glob("*.json")}
    assert shipped == {name: f for f in FAMILIES for name in family_class(f).bench_configs}
    for name in shipped:
        assert benchmark.load_config(benchmark.resolve_model(name)).model_type in FAMILIES


def test_no_family_list_outside_the_registry():
    """No module of the package spells out the built-in families (the testbed's own two models aside)."""
    offenders = []
    for path in (REPO / "vtprune").rglob("*.py"):
        if path.parent.name in ("models", "adapters"):
            continue
        text = path.read_text()
        if any(f'"{f}"' in text or f"'{f}'" in text for f in ("llava_next", "qwen2_5_vl")):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
