"""Every registered pruner x every family x its default site: keep-all identity, exact budgets,
cached == uncached generation and batch == single. New pruners are covered by registering them."""

from __future__ import annotations

import pytest
import torch

import vtprune
from conftest import GEN, batch_inputs, model
from vtprune.capture import HINTS
from vtprune.registry import pruner_class
from vtprune.testing import FAMILIES

PRUNERS = [name for name in vtprune.list_pruners() if not name.startswith("_")]
CASES = [(p, f) for p in PRUNERS for f in FAMILIES]


def _generate(tv, inputs, **kw):
    out = tv.model.generate(**inputs, **{**GEN, **kw})
    return out.sequences, torch.stack(out.logits, 1)


def _default_site(name: str) -> str:
    return pruner_class(name).config_class().site


def _hints(tv, samples: list[int], n_images: int = 1) -> list[dict]:
    """Hints for pruners that read them (``informed``): per row, a priority per visual token that depends only on
    its sample id, so batch == single still has to hold. Image sizes come from an unpruned pass's stats, so call
    this while no other handle is on the model."""
    with vtprune.apply(tv.model, "random", keep=1.0) as probe:
        tv.model(**batch_inputs(tv, samples, n_images))
        sizes = [[before for before, _ in s.images] for s in probe.stats.samples]
    return [{"token_priority": {"question": [[(j * (s + 2) + i) % 3 for j in range(v)] for i, v in enumerate(row)]}}
            for s, row in zip(samples, sizes)]


def _hinted(handle, hints: list[dict]):
    """``handle`` with ``hints`` set when its pruner reads them."""
    if HINTS in handle.pruner.needs:
        handle.set_hints(hints)
    return handle


@pytest.mark.parametrize("pruner,family", CASES)
def test_keep_all_is_identity(pruner, family):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    ref = tv.model(**inputs).logits
    ref_seq, _ = _generate(tv, inputs)
    with vtprune.apply(tv.model, pruner, keep=1.0):
        assert torch.equal(tv.model(**inputs).logits, ref)
        assert torch.equal(_generate(tv, inputs)[0], ref_seq)


@pytest.mark.parametrize("pruner,family", CASES)
def test_exact_budgets_cached_equals_uncached(pruner, family):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    for keep in (0.3, 3):
        hints = _hints(tv, [0, 1])
        with _hinted(vtprune.apply(tv.model, pruner, keep=keep), hints) as handle:
            seq_c, step_c = _generate(tv, inputs)
            for before, after in (img for s in handle.stats.samples for img in s.images):
                assert after == vtprune.view.budget(keep, before), (before, after)
            seq_u, step_u = _generate(tv, inputs, use_cache=False)
        assert torch.equal(seq_c, seq_u)
        torch.testing.assert_close(step_c, step_u, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pruner,family", CASES)
def test_batch_equals_single(pruner, family):
    tv = model(family)
    samples = [0, 1, 2]
    hints = _hints(tv, samples)
    with _hinted(vtprune.apply(tv.model, pruner, keep=0.4), hints) as handle:
        seq_b, step_b = _generate(tv, batch_inputs(tv, samples))
        for row, sample in enumerate(samples):
            _hinted(handle, [hints[row]])
            seq_s, step_s = _generate(tv, batch_inputs(tv, [sample]))
            n = GEN["max_new_tokens"]
            assert torch.equal(seq_b[row, -n:], seq_s[0, -n:])
            torch.testing.assert_close(step_b[row], step_s[0], atol=1e-4, rtol=1e-4)


def test_every_pruner_has_a_documented_config():
    for name in PRUNERS:
        cls = pruner_class(name)
        assert cls.__doc__ and cls.config_class.__doc__, name
        assert _default_site(name) in cls.sites


@pytest.mark.parametrize("pruner,family", [(p, f) for p in PRUNERS for f in ("llava", "qwen2_vl")])
def test_several_images_per_prompt(pruner, family):
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1], n_images=2)
    hints = _hints(tv, [0, 1], n_images=2)
    with _hinted(vtprune.apply(tv.model, pruner, keep=0.4), hints) as handle:
        seq_c, step_c = _generate(tv, inputs)
        assert [len(s.images) for s in handle.stats.samples] == [2, 2]
        seq_u, step_u = _generate(tv, inputs, use_cache=False)
    assert torch.equal(seq_c, seq_u)
    torch.testing.assert_close(step_c, step_u, atol=1e-5, rtol=1e-5)
