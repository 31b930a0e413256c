"""A local checkpoint folder of every family (``save_pretrained`` of model and processor) loads through vtprune's
loading path (``benchmark.build_model``, the harness's ``load_processor``, offline) and prunes exactly like the
in-memory model."""

from __future__ import annotations

import pytest
import torch
from conftest import image_for, model

import vtprune
from vtprune import benchmark
from vtprune.harness.models import load_processor
from vtprune.testing import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_folder_loads_and_prunes_like_the_model(family, tmp_path):
    tv = model(family)
    tv.model.save_pretrained(tmp_path)
    tv.processor.save_pretrained(tmp_path)
    loaded = benchmark.build_model(str(tmp_path))
    assert type(loaded) is type(tv.model)
    proc = load_processor(tmp_path)
    prompt, image = tv.prompt("how many"), image_for(family, 1)
    inputs = dict(proc(text=[prompt], images=[[image]], return_tensors="pt"))
    with torch.no_grad():
        full = tv.model(**inputs).logits
        with vtprune.apply(loaded, "uniform", keep=0.5) as handle:
            got = loaded(**inputs).logits
            assert handle.stats.visual_after[0] < handle.stats.visual_before[0]
        with vtprune.apply(tv.model, "uniform", keep=0.5):
            want = tv.model(**inputs).logits
    assert got.shape[1] < full.shape[1]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
