"""Signals pruners can ask for: decoder-layer q/k (in-LLM) and vision-encoder q/k, captured by hooks while
SDPA keeps running. Each is checked against an independent ground truth."""

from __future__ import annotations

import pytest
import torch

import vtprune
from conftest import batch_inputs, layer_attentions, model
from vtprune.registry import _REGISTRY
from vtprune.ops import lattice
from vtprune.testing import FAMILIES

K = 2


def _register(name: str, needs: set[str], vision_layers=None):
    """A throwaway pruner that records its views and keeps a lattice."""
    class Probe(vtprune.Pruner):
        config_class = type(f"{name}Config", (vtprune.UniformConfig,), {"name": name})
        views: list = []

        def vision_layers(self, full, n):
            return vision_layers(full, n) if vision_layers else []

        def select(self, view, k):
            Probe.views.append(view)
            return lattice(view.num_tokens, k)

    Probe.needs = frozenset(needs)
    vtprune.register_pruner(Probe)
    return Probe


@pytest.fixture
def probes():
    made = []

    def make(name, needs, vision_layers=None):
        made.append(name)
        return _register(name, needs, vision_layers)
    yield make
    for name in made:
        del _REGISTRY[name]


def _last_token_attention(qk) -> torch.Tensor:
    """Head-mean attention of the last prompt token over all tokens, from captured q/k (GQA expanded)."""
    key = qk.key.repeat_interleave(qk.query.shape[0] // qk.key.shape[0], dim=0)
    scores = (qk.query[:, -1:] @ key.transpose(-1, -2)).squeeze(1) * qk.scaling
    if qk.window is not None:  # a sliding-window layer: keys at least `window` tokens back are masked
        scores[:, :-qk.window] = float("-inf")
    return scores.softmax(-1).mean(0)


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_qk_reproduces_eager_attention_weights(family, probes):
    probe = probes("_probe_llm", {"llm_qk"})
    tv = model(family, "sdpa")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "_probe_llm", keep=0.5, site="layer", layer=K):
        tv.model(**inputs)
    eager = model(family, "eager")
    attn = layer_attentions(eager, inputs, K - 1)  # [b, H, L, L]
    for view in probe.views:
        real = inputs["attention_mask"][view.sample].bool()
        expected = attn[view.sample, :, -1][:, real].mean(0)
        got = _last_token_attention(view.extras["llm_qk"])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        assert view.extras["llm_qk"].image.numel() == view.num_tokens


def test_llm_qk_needs_the_layer_site(probes):
    probes("_probe_llm2", {"llm_qk"})
    with pytest.raises(vtprune.VTPruneError, match="needs site='layer'"):
        vtprune.apply(model("llava").model, "_probe_llm2", keep=0.5)


def test_clip_cls_attention_matches_eager(probes):
    probe = probes("_probe_vis", {"vision_qk"}, lambda full, n: [-2])
    tv = model("llava", "sdpa")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "_probe_vis", keep=0.5):
        tv.model.generate(**inputs, max_new_tokens=2, do_sample=False)  # generate encodes images up front
    eager = model("llava", "eager")
    attn = eager.model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    n_layers = len(attn)
    for view in probe.views[:2]:
        (vq,) = view.extras["vision_qk"][n_layers - 2]
        keys = torch.cat([vq.cls_key[:, None], vq.key], 1)
        probs = ((vq.cls_query[:, None] @ keys.transpose(-1, -2)).squeeze(1) * vq.scaling).softmax(-1)
        torch.testing.assert_close(probs, attn[-2][view.image, :, 0], atol=1e-6, rtol=1e-5)
        assert torch.equal(vq.token_of_patch, torch.arange(view.num_tokens))


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_patch_to_token_mapping_is_exact(family, probes):
    """Each patch's ``token_of_patch`` is where its features really go: re-projecting / re-merging the
    encoder's own outputs at the mapped indices reproduces the LM's visual inputs exactly."""
    probe = probes("_probe_map", {"vision_qk"}, lambda full, n: [full[-1]])
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    backbone = tv.model.model
    seen = {}
    hook_mod = backbone.multi_modal_projector if family == "llava_next" else backbone.visual.merger
    h1 = hook_mod.register_forward_pre_hook(lambda m, a: seen.update({"in": a[0]}))
    h2 = backbone.language_model.register_forward_pre_hook(lambda m, a, k: seen.update({"lm": k["inputs_embeds"]}),
                                                           with_kwargs=True)
    try:
        with vtprune.apply(tv.model, "_probe_map", keep=0.5):
            tv.model(**inputs)
    finally:
        h1.remove()
        h2.remove()
    ids = inputs["input_ids"]
    for view in probe.views:
        feats = seen["lm"][view.sample, ids[view.sample] == tv.model.config.image_token_id]
        offset = sum(v.num_tokens for v in probe.views if v.sample == view.sample and v.image < view.image)
        feats = feats[offset:offset + view.num_tokens]
        views = next(iter(view.extras["vision_qk"].values()))
        covered = torch.zeros(view.num_tokens, dtype=torch.long)
        if family == "llava_next":
            projected = hook_mod(seen["in"])  # [views, P, D]
            first = sum(len(next(iter(v.extras["vision_qk"].values()))) for v in probe.views if v.image < view.image)
            for j, vq in enumerate(views):
                ok = vq.token_of_patch >= 0
                torch.testing.assert_close(projected[first + j][ok], feats[vq.token_of_patch[ok]], atol=0, rtol=0)
                covered += torch.bincount(vq.token_of_patch[ok], minlength=view.num_tokens)
            newline = (feats == backbone.image_newline).all(-1)
            assert bool((covered[~newline] == 1).all()) and bool((covered[newline] == 0).all())
            assert len(views) > 1  # base view + crops were mapped
        else:
            (vq,) = views
            start = sum(4 * v.num_tokens for v in probe.views if v.image < view.image)
            for t in range(view.num_tokens):
                idx = (vq.token_of_patch == t).nonzero().flatten() + start
                assert idx.numel() == 4
                torch.testing.assert_close(hook_mod(seen["in"][idx])[0], feats[t], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_projector_inputs_reproduce_the_visual_tokens(family, probes):
    """Re-projecting each token's captured projector inputs gives exactly the LM's visual input."""
    probe = probes("_probe_proj", {"projector"})
    tv = model(family)
    inputs = batch_inputs(tv, [0, 1])
    seen = {}
    lm = tv.model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, k: seen.update({"lm": k["inputs_embeds"]}), with_kwargs=True)
    try:
        with vtprune.apply(tv.model, "_probe_proj", keep=0.5):
            tv.model(**inputs)
    finally:
        h.remove()
    ids = inputs["input_ids"]
    for view in probe.views:
        proj = view.extras["projector"]
        feats = seen["lm"][view.sample, ids[view.sample] == tv.model.config.image_token_id]
        offset = sum(v.num_tokens for v in probe.views if v.sample == view.sample and v.image < view.image)
        feats = feats[offset:offset + view.num_tokens]
        exact = proj.valid if proj.exact is None else proj.exact  # OneVision's resized tokens: nearest source
        out = proj.project(proj.inputs[exact])
        torch.testing.assert_close(out, feats[exact], atol=1e-6, rtol=1e-5)
        assert proj.inputs.shape[1] == (1 if family.startswith("llava") else 4)
        assert bool(proj.valid.all()) == (family not in ("llava_next", "llava_onevision"))


def test_refused_apply_leaves_no_hooks(probes):
    probes("_probe_llm3", {"llm_qk"})
    tv = model("llava")
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tv.model.modules())
    with pytest.raises(vtprune.VTPruneError):
        vtprune.apply(tv.model, "_probe_llm3", keep=0.5)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tv.model.modules()) == before
    vtprune.apply(tv.model, "uniform", keep=0.5).remove()  # and the model is not marked as hooked
