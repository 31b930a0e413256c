"""The README's support matrix is generated from the registries and stays true: it is up to date, it follows a
newly registered family, and what it claims (tested attention, [CLS] or not) is what the code does."""

from __future__ import annotations

from pathlib import Path

import pytest

import vtprune
from conftest import ATTN, batch_inputs, model
from vtprune import models, support
from vtprune.cli import main
from vtprune.errors import VTPruneError
from vtprune.models import LlavaAdapter, family_class, register_family, registered_families
from vtprune.registry import _REGISTRY
from vtprune.ops import lattice

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_matrix_is_up_to_date():
    assert main(["support-matrix", "--check", str(README)]) == 0


def test_check_fails_on_a_stale_block_and_write_fixes_it(tmp_path):
    stale = tmp_path / "R.md"
    stale.write_text(f"intro\n{support.BEGIN}\n| old |\n{support.END}\nrest\n")
    assert main(["support-matrix", "--check", str(stale)]) == 1
    assert main(["support-matrix", "--write", str(stale)]) == 0
    assert main(["support-matrix", "--check", str(stale)]) == 0
    text = stale.read_text()
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and "| old |" not in text


def test_missing_markers_are_a_named_error(tmp_path):
    plain = tmp_path / "R.md"
    plain.write_text("no block here\n")
    with pytest.raises(VTPruneError, match="no support-matrix block"):
        support.replace_block(plain.read_text(), support.support_markdown())
    assert main(["support-matrix", "--write", str(plain)]) == 2


def test_a_registered_family_appears_with_its_limits():
    class Toy(LlavaAdapter):
        family = "toy_matrix"
        model_classes = ("ToyMatrixForConditionalGeneration",)
        vision_cls = False
        site_limits = {"layer": "K must be >= 3 (why)"}

    register_family(Toy)
    try:
        row = next(r for r in support.support_rows() if r["family"] == "toy_matrix")
        assert row["cls"] == "no" and "vtc_cls" in row["fallback"] and "visionzip" in row["fallback"]
        assert row["limits"] == "layer: K must be >= 3 (why)" and "layer (original)¹" in row["sites"]
        assert "pre_llm (original/compact)," in row["sites"]
    finally:
        del models._REGISTRY["toy_matrix"]
    assert "toy_matrix" not in registered_families()


@pytest.mark.parametrize("family", registered_families())
def test_matrix_claims_hold(family):
    """'attention (tested)' is what the exactness suite runs; 'vision [CLS]' is what the capture sees."""
    assert tuple(family_class(family).tested_attention) == ATTN
    seen = []

    class Probe(vtprune.Pruner):
        config_class = type("ProbeClsConfig", (vtprune.UniformConfig,), {"name": "_probe_cls"})
        needs = frozenset({"vision_qk"})

        def vision_layers(self, full, n):
            return [full[-1]]

        def select(self, view, k):
            seen.append(view.extras["vision_qk"])
            return lattice(view.num_tokens, k)

    vtprune.register_pruner(Probe)
    try:
        tv = model(family, "sdpa")
        with vtprune.apply(tv.model, "_probe_cls", keep=0.5):
            tv.model(**batch_inputs(tv, [0]))
    finally:
        del _REGISTRY["_probe_cls"]
    layers = seen[0]
    views = next(iter(layers.values()))
    assert all((v.cls_query is not None) == family_class(family).vision_cls for v in views)
