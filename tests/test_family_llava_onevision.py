"""LLaVA-OneVision only: anyres-max geometry (unpadding, the bilinear resize, row newlines, base-only views of
multi-image prompts) checked against the model's own ``pack_image_features``; the patch -> token maps of the vision
q/k and projector signals; image sizes reaching the adapter in ``generate``; video tokens left alone. Each check
has a negative control that fails when the family-specific step is left out."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import model

import vtprune
from vtprune import benchmark as B
from vtprune import flops as F
from vtprune.capture import InputCapture
from vtprune.errors import VTPruneError
from vtprune.models import adapter_for
from vtprune.models.llava_next import LlavaNextAdapter
from vtprune.models.llava_onevision import (
    anyres_geometry,
    image_geometries,
    nearest_sources,
)
from vtprune.testing import random_image

FAMILY = "llava_onevision"
#: (width, height): 2x2 views resized 8x8 -> 5x5; 1x2 and 2x1 views; one view; very elongated both ways; a 2x2
#: grid unpadded to 6x8 and resized to 4x6
SIZES = [(112, 112), (112, 56), (56, 112), (56, 56), (200, 30), (30, 200), (150, 110)]


def _inputs(tv, images: list, question: str = "describe") -> dict:
    return tv.inputs([tv.prompt(question, len(images))], [images])


def _packed(tv, inputs) -> list[torch.Tensor]:
    """The model's own per-image visual tokens."""
    m = tv.model.model
    with torch.no_grad():
        return list(m.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                         batch_num_images=inputs["batch_num_images"]).pooler_output)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_layout_and_counts_follow_the_model(size):
    tv = model(FAMILY)
    adapter = adapter_for(tv.model)
    inputs = _inputs(tv, [random_image(0, size)])
    feats = _packed(tv, inputs)[0]
    geo = image_geometries(tv.model.config, inputs)[0]
    placeholders = int((inputs["input_ids"] == tv.model.config.image_token_id).sum())
    assert placeholders == feats.shape[0] == geo.tokens == adapter.image_counts(inputs)[0]
    layout = adapter.layout(feats, torch.zeros(1, feats.shape[0]))
    base, crops = layout.segments
    assert (base.rows, base.cols, base.newline) == (4, 4, False)
    assert (crops.rows, crops.cols, crops.newline) == (*geo.canvas.shape, True)
    newline = tv.model.model.image_newline
    is_nl = (feats == newline).all(-1)
    expected = torch.zeros_like(is_nl)
    expected[16 + geo.canvas.shape[1]::geo.canvas.shape[1] + 1] = True
    assert torch.equal(is_nl, expected)
    if size == (112, 112):  # negative control: LLaVA-NeXT's count knows no anyres-max resize
        assert geo.resized and LlavaNextAdapter.anyres_tokens(tv.model.config, [size[1], size[0]]) != geo.tokens


def test_multi_image_prompts_get_base_views_only():
    tv = model(FAMILY)
    inputs = _inputs(tv, [random_image(0, (112, 112)), random_image(1, (56, 112))])
    feats = _packed(tv, inputs)
    geoms = image_geometries(tv.model.config, inputs)
    assert [f.shape[0] for f in feats] == [g.tokens for g in geoms] == [17, 17]
    assert F.vision_work(tv.model, inputs).views == 2
    layout = adapter_for(tv.model).layout(feats[0], torch.zeros(1, 17))
    assert [(s.rows, s.cols, s.newline) for s in layout.segments] == [(4, 4, False), (1, 0, True)]
    # negative control: without batch_num_images every image would get its AnyRes views
    unpatched = dict(inputs, batch_num_images=None)
    assert [g.tokens for g in image_geometries(tv.model.config, unpatched)] != [17, 17]
    measured = F.measured_flops(lambda: tv.model(**inputs))
    report = F.flops_unpruned(tv.model, inputs, logits_to_keep=0)
    assert abs(report.prefill_total - measured) <= 0.02 * measured


def test_nearest_sources_are_the_bilinear_argmax():
    # 8 -> 5: sources at 0.3, 1.9, 3.5, 5.1, 6.7 -> 0, 2, 3 (tie: first), 5, 7
    assert nearest_sources(8, 5).tolist() == [0, 2, 3, 5, 7]
    # negative control: plain nearest-neighbour indexing is a different map
    assert (torch.arange(5) * 8 // 5).tolist() != [0, 2, 3, 5, 7]


@pytest.mark.parametrize("size", [(112, 112), (150, 110), (200, 30), (56, 112)], ids=str)
def test_token_of_patch_follows_pack_image_features(size):
    """Push one-hot patch features through the model's ``pack_image_features``: every packed token's largest
    component names the patch feeding it (a resized token: its largest-weight bilinear source)."""
    tv = model(FAMILY)
    m = tv.model.model
    inputs = _inputs(tv, [random_image(0, size)])
    geo = image_geometries(tv.model.config, inputs)[0]
    n = geo.views * 16
    onehot = torch.eye(n, dtype=torch.float64).view(geo.views, 16, n)
    packed = m.pack_image_features([onehot], inputs["image_sizes"], torch.full((n,), -1.0, dtype=torch.float64),
                                   vision_aspect_ratio=tv.model.config.vision_aspect_ratio)[0][0]
    real = packed.max(-1).values >= 0  # newline tokens are all -1
    source = packed.argmax(-1)

    def check(maps: list[torch.Tensor]) -> bool:
        token = torch.cat(maps)  # [views * 16], patch-major over views
        fed = token[token >= 0]
        if fed.numel() != int(real.sum()) or fed.unique().numel() != fed.numel() or bool((~real[fed]).any()):
            return False
        patch = (token >= 0).nonzero().flatten()
        return torch.equal(source[token[patch]], patch)

    assert check(geo.token_of_patch(torch.device("cpu")))
    # negative control: the geometry without the anyres-max resize (or LLaVA-NeXT's crop grid) maps wrongly
    if geo.resized:
        config = copy.deepcopy(tv.model.config)
        config.vision_aspect_ratio = "anyres_max_100"
        unresized = anyres_geometry(config, [size[1], size[0]])
        assert not unresized.resized and not check(unresized.token_of_patch(torch.device("cpu")))


@pytest.mark.parametrize("size", [(112, 112), (112, 56)], ids=str)
def test_signals_map_patches_to_tokens(size):
    """Projector inputs re-project to the model's own tokens (resized ones: to their nearest source's projected
    feature); vision q/k views carry no [CLS] and the geometry's patch -> token maps."""
    tv = model(FAMILY)
    adapter = adapter_for(tv.model)
    inputs = _inputs(tv, [random_image(0, size)])
    proj_cap, tower_cap = InputCapture(armed=True), InputCapture(armed=True)
    last = adapter.num_vision_layers - 1
    attn_cap = InputCapture(armed=True)
    hooks = [adapter.projector.register_forward_pre_hook(proj_cap, with_kwargs=True),
             adapter.vision_attention(last).register_forward_pre_hook(attn_cap, with_kwargs=True)]
    try:
        feats = _packed(tv, inputs)[0]
    finally:
        for h in hooks:
            h.remove()
    spans = adapter.locate_images(dict(inputs))
    layouts = [adapter.layout(feats, torch.zeros(1, feats.shape[0]))]
    geo = image_geometries(tv.model.config, inputs)[0]
    with torch.no_grad():
        proj = adapter.projector_inputs(proj_cap, tower_cap, layouts)[0]
        again = proj.project(proj.inputs)
        views = adapter.vision_qk(last, attn_cap, tower_cap, layouts)[0]
        projected = adapter.projector(proj_cap.tensor("image_features", call=0))  # [views, 16, D]
    assert spans is not None and proj.valid.sum() == feats.shape[0] - geo.canvas.shape[0]
    maps = geo.token_of_patch(torch.device("cpu"))
    assert len(views) == geo.views and all(v.cls_query is None and v.query.shape[1] == 16 for v in views)
    assert all(torch.equal(v.token_of_patch, t) for v, t in zip(views, maps))
    for view, token in enumerate(maps):
        ok = token >= 0
        torch.testing.assert_close(again[token[ok]], projected[view][ok])
    if not geo.resized:  # every token re-projects exactly to the model's
        assert proj.exact is None
        torch.testing.assert_close(again[proj.valid], feats[proj.valid])
    else:  # the base view does; resized crop tokens are not the blend, and say so
        assert torch.equal(proj.exact, torch.arange(feats.shape[0]) < 16)
        torch.testing.assert_close(again[:16], feats[:16])
        assert not torch.allclose(again[16:][proj.valid[16:]], feats[16:][proj.valid[16:]])


def test_generate_reads_image_sizes_from_the_generate_call(monkeypatch):
    """``generate`` encodes images before its first forward, without image sizes at the backbone: the adapter
    reads them from the generate call. Vision-signal pruning then picks the same tokens as a plain forward."""
    tv = model(FAMILY)
    inputs = _inputs(tv, [random_image(0, (112, 112))])
    with vtprune.apply(tv.model, "vispruner", keep=0.25) as handle:
        logits = tv.model(**inputs).logits[:, -1]
        out = tv.model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        torch.testing.assert_close(out.logits[0], logits, atol=1e-5, rtol=1e-5)
        assert handle.stats.samples[0].images == [(46, 12)]
        # negative control: without the generate hook the adapter cannot know the geometry
        monkeypatch.setattr(adapter_for(tv.model).__class__, "observe_generate", lambda self, kwargs: None)
    with vtprune.apply(tv.model, "vispruner", keep=0.25), pytest.raises(VTPruneError, match="image sizes|image_sizes"):
        tv.model.generate(**inputs, max_new_tokens=1, do_sample=False)


def test_video_tokens_are_not_image_tokens():
    tv = model(FAMILY)
    frames = [random_image(i, (56, 56)) for i in range(2)]
    prompt = "<|im_start|> user <video> <image> describe <|im_end|> <|im_start|> assistant"
    inputs = dict(tv.processor(text=[prompt], images=[random_image(0, (112, 56))], videos=[frames],
                               return_tensors="pt"))
    ids = inputs["input_ids"][0]
    n_video = int((ids == tv.model.config.video_token_id).sum())
    assert n_video == 2 * 4 + 1
    adapter = adapter_for(tv.model)
    assert int(adapter.image_mask(inputs["input_ids"], None).sum()) == 52
    with torch.no_grad(), vtprune.apply(tv.model, "uniform", keep=0.5) as handle:
        tv.model(**inputs)
        stats = handle.stats
    assert stats.samples[0].images == [(9, 5), (52, 26)]  # the video is an item of its own (docs/video.md)
    assert stats.samples[0].layer_seq_lens[0] == ids.numel() - 26 - 4
    # the FLOPs count includes the video frames the tower encodes
    assert F.vision_work(tv.model, inputs).views == 3 + 2


# ---- benchmark config, saved checkpoints, lmms-eval ---------------------------------------------------------
def test_real_config_and_synthetic_inputs():
    cfg = B.load_config(B.resolve_model("llava-onevision-7b"))
    dims = F.LLMDims.from_config(cfg)
    assert (dims.layers, dims.hidden, dims.kv_heads, dims.intermediate) == (28, 3584, 4, 18944)
    assert (cfg.vision_config.image_size, cfg.vision_config.num_hidden_layers, cfg.vision_aspect_ratio) == (
        384, 26, "anyres_max_9")
    inputs = B.synthetic_inputs(cfg)  # default: 2x2 views of 384 px, 27x27 patches each
    assert inputs["pixel_values"].shape[:2] == (1, 5)
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 729 + 54 * 55
    big = anyres_geometry(cfg, [2304, 2304])  # 6x6 views: 162x162 crop grid resized by anyres_max_9 to 81x81
    assert big.resized and big.views == 37 and tuple(big.canvas.shape) == (81, 81) and big.tokens == 729 + 81 * 82
    work = F.vision_work(cfg, inputs)
    assert work.views == 5 and F.vision_flops(cfg, work)["projector"] == 5 * 2 * 729 * (1152 * 3584 + 3584 * 3584)


def test_real_config_geometry_matches_the_processor_counts():
    """At real scale (27x27 patches, 6x6 grids, anyres_max_9) the geometry's token count equals the processor's
    placeholder count for random image sizes, most of them resized."""
    from types import SimpleNamespace

    from transformers import LlavaOnevisionProcessor

    cfg = B.load_config(B.resolve_model("llava-onevision-7b"))
    proc = object.__new__(LlavaOnevisionProcessor)  # only its counting methods are used
    proc.num_image_tokens, proc.vision_aspect_ratio = 729, cfg.vision_aspect_ratio
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints)
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(20, 4000, (100, 2), generator=gen).tolist()
    geoms = [anyres_geometry(cfg, size) for size in sizes]
    assert [proc._get_number_of_features(h, w, 384, 384) for h, w in sizes] == [g.tokens for g in geoms]
    assert sum(g.resized for g in geoms) > 30


def test_lmms_eval_cli_runs_the_pruned_wrapper(tmp_path):
    """The stock lmms-eval CLI (through a sweep on the lmms_eval backend) runs ``vtprune_llava_hf`` on a saved tiny
    OneVision model: lmms-eval's llava_hf classes load ``LlavaOnevisionForConditionalGeneration``."""
    pytest.importorskip("lmms_eval")
    from lmms_sweep import lmms_sweep

    (base, base_results), (pruned, pruned_results) = lmms_sweep(tmp_path, FAMILY, keep=4)
    # the shapes task's images have 2x2 views: 16 base tokens + the 8x8 crop grid resized to 5x5 with newlines
    for record, results, after in ((base, base_results, 46), (pruned, pruned_results, 4)):
        assert record["status"] == "ok", record.get("error")
        assert results["config"]["model"] == "vtprune_llava_hf"
        throughput = results["throughput"]
        assert throughput["avg_vtprune_visual_before"] == 46 and throughput["avg_vtprune_visual_after"] == after
    assert pruned["lmms_eval"]["command"].startswith("lmms-eval --model vtprune_llava_hf --model_args pretrained=")
