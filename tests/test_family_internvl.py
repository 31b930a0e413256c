"""What only InternVL has: tiles + thumbnail as views of one placeholder run, the pixel shuffle's patch -> token map,
InternViT's [CLS] q/k (with q/k norms), the LayerNorm projector, per-tile ``pooler_output``, and the real-size
config. Each check has a negative control that fails when the InternVL-specific gather is left out."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import batch_inputs, model

import vtprune
from vtprune import benchmark as B
from vtprune import flops as F
from vtprune.capture import rotate
from vtprune.models import ModelAdapter, adapter_for
from vtprune.models.internvl import InternVLAdapter
from vtprune.ops import (
    cls_attention_scores,
    graph_of,
    lattice,
    pooled,
    received_attention,
)
from vtprune.registry import _REGISTRY
from vtprune.testing import random_image

FAMILY = "internvl"


def _shuffle(features: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """The model's own pixel shuffle ([b, rows, cols, C] -> [b, tokens, C / ratio²])."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    out = InternVLModel.pixel_shuffle(None, features, scale_factor=ratio)
    return out.reshape(features.shape[0], -1, out.shape[-1])


@pytest.fixture
def probe():
    """A throwaway pruner that records its views (vision q/k of every encoder layer, projector inputs)."""
    class Probe(vtprune.Pruner):
        config_class = type("_ivl_probeConfig", (vtprune.UniformConfig,), {"name": "_ivl_probe"})
        needs = frozenset({"vision_qk", "projector"})
        views: list = []

        def vision_layers(self, full, n):
            return list(range(n))

        def select(self, view, k):
            Probe.views.append(view)
            return lattice(view.num_tokens, k)

    vtprune.register_pruner(Probe)
    yield Probe
    del _REGISTRY["_ivl_probe"]


def _two_image_inputs(tv) -> dict:
    """One prompt with two adjacent images: 4 tiles + thumbnail (112x112) and 2 tiles + thumbnail (112x56)."""
    prompt = tv.prompt("describe", n_images=2)
    return tv.inputs([prompt], [[random_image(0, (112, 112)), random_image(1, (112, 56))]])


# ---- pixel shuffle ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["tiny", "internvl3-8b"])
def test_patch_to_token_map_is_the_models_pixel_shuffle(config):
    cfg = model(FAMILY).model.config if config == "tiny" else B.load_config(B.resolve_model(config))
    rows, cols = InternVLAdapter.patch_grid(cfg)
    ids = torch.arange(rows * cols, dtype=torch.float64).view(1, rows, cols, 1)  # each patch carries its index
    fed = _shuffle(ids, cfg.downsample_ratio)[0].long()  # [tokens, s²]: the patches of each token, block order
    token = InternVLAdapter.patch_tokens(cfg)
    assert fed.shape == (InternVLAdapter.tokens_per_view(cfg), 4) and cfg.image_seq_length == fed.shape[0]
    for t in range(fed.shape[0]):
        assert torch.equal((token == t).nonzero().flatten(), fed[t])  # raster order == channel-block order
    naive = torch.arange(rows * cols) // 4  # negative control: consecutive raster patches are not a token
    assert not all(torch.equal((naive == t).nonzero().flatten(), fed[t]) for t in range(fed.shape[0]))


# ---- images: one run of context tokens each, made of views ------------------------------------------------
def test_images_are_placeholder_runs_not_tiles():
    tv = model(FAMILY)
    inputs = _two_image_inputs(tv)
    ids = inputs["input_ids"]
    assert inputs["pixel_values"].shape[0] == 5 + 3
    adapter = adapter_for(tv.model)
    # generate hands the backbone pre-encoded features: one entry per *tile*
    per_tile = {"image": SimpleNamespace(pooler_output=list(torch.zeros(8, 4, 64)))}
    call = {"input_ids": ids, "mm_encoder_outputs": per_tile}
    spans = adapter.locate_images(call)
    assert [p.numel() for p in spans.positions] == [20, 12]
    start, end = tv.processor.start_image_token_id, tv.processor.end_image_token_id
    for p in spans.positions:  # each span is exactly what one <img> ... </img> pair encloses
        assert ids[0, p[0] - 1] == start and ids[0, p[-1] + 1] == end
    # negative control: counting the features (the base adapter's rule) would make every tile an image
    naive = type("NaiveInternVL", (InternVLAdapter,), {"image_counts": ModelAdapter.image_counts})(tv.model)
    assert [p.numel() for p in naive.locate_images(call).positions] == [4] * 8
    with torch.no_grad(), vtprune.apply(tv.model, "uniform", keep=0.5) as handle:
        tv.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.stats.samples[0].images == [(20, 10), (12, 6)]


def test_video_frames_are_one_view_images(probe):
    """Frames share the image placeholder id (``Frame{i}: <img>...</img>``): each is a one-view image, in the
    order the processor stacked the views (the image's tiles first, then the frames)."""
    import numpy as np

    tv = model(FAMILY)
    video = np.random.default_rng(0).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    prompt = "<|im_start|> user <IMG_CONTEXT> <video> describe <|im_end|> <|im_start|> assistant"
    inputs = dict(tv.processor(text=[prompt], images=[[random_image(0, (112, 56))]], videos=[video],
                               return_tensors="pt"))
    assert inputs["pixel_values"].shape[0] == 3 + 4
    lm = {}
    hook = tv.model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: lm.update(embeds=k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad(), vtprune.apply(tv.model, "_ivl_probe", keep=0.5) as handle:
            tv.model(**inputs)
            assert handle.stats.samples[0].images == [(12, 6)] + [(4, 2)] * 4
    finally:
        hook.remove()
    assert [len(v.extras["vision_qk"][0]) for v in probe.views] == [3, 1, 1, 1, 1]
    assert F.vision_work(tv.model, inputs).views == 7
    feats = lm["embeds"][0, inputs["input_ids"][0] == tv.model.config.image_token_id]
    start = 0
    for view in probe.views:
        p = view.extras["projector"]
        with torch.no_grad():
            torch.testing.assert_close(p.project(p.inputs), feats[start:start + view.num_tokens], atol=1e-6, rtol=1e-5)
        start += view.num_tokens
    # negative control: frames are distinct views (reading another frame's projector inputs is wrong)
    a, b = probe.views[1].extras["projector"], probe.views[2].extras["projector"]
    with torch.no_grad():
        assert not torch.allclose(a.project(b.inputs), feats[12:16], atol=1e-3)


# ---- vision attention: [CLS], q/k norms, per view --------------------------------------------------------
def test_vision_qk_is_the_towers_attention_view_by_view(probe):
    tv = model(FAMILY)
    inputs = batch_inputs(tv, [0, 1])  # 5 views and 3 views
    with torch.no_grad(), vtprune.apply(tv.model, "_ivl_probe", keep=0.5):
        tv.model(**inputs)
    tower = model(FAMILY, "eager").model.model.vision_tower
    with torch.no_grad():
        attn = tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions  # [views, H, 17, 17]
    assert len(probe.views) == 2
    view_index = 0
    local = InternVLAdapter.patch_tokens(tv.model.config)
    for view in probe.views:
        per_layer = view.extras["vision_qk"]
        assert sorted(per_layer) == [0, 1]
        n_views = len(per_layer[0])
        assert n_views == view.num_tokens // 4 == len(view.layout.segments)
        for layer, views in per_layer.items():
            for j, vq in enumerate(views):
                q = torch.cat([vq.cls_query[:, None], vq.query], 1)
                k = torch.cat([vq.cls_key[:, None], vq.key], 1)
                probs = (q @ k.transpose(-1, -2) * vq.scaling).softmax(-1)
                torch.testing.assert_close(probs, attn[layer][view_index + j], atol=1e-6, rtol=1e-5)
                assert torch.equal(vq.token_of_patch, local + 4 * j)
        view_index += n_views
    assert view_index == inputs["pixel_values"].shape[0]
    # negative control: the q/k norms (on in the tiny tower) are part of the signal
    attention = tv.model.model.vision_tower.encoder.layer[0].attention
    hidden = tv.model.model.vision_tower.encoder.layer[0].layernorm_before(
        tv.model.model.vision_tower.embeddings(inputs["pixel_values"][:1]))
    raw_q = attention.q_proj(hidden).view(1, 17, 4, -1).transpose(1, 2)
    assert not torch.allclose(raw_q[0, :, 0], probe.views[0].extras["vision_qk"][0][0].cls_query, atol=1e-3)


def test_cls_methods_read_the_real_cls_row(probe):
    """[CLS]-reading scorers use InternViT's own [CLS] row (no received-attention fallback): each token's score
    is the eager [CLS] attention its 2x2 patches get in the penultimate layer, view by view."""
    tv = model(FAMILY)
    inputs = batch_inputs(tv, [0])
    with torch.no_grad(), vtprune.apply(tv.model, "_ivl_probe", keep=0.5):
        tv.model(**inputs)
    tower = model(FAMILY, "eager").model.model.vision_tower
    with torch.no_grad():
        cls_row = tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[0][:, :, 0, 1:]
    (view,) = probe.views
    expected = torch.zeros(view.num_tokens)
    local = InternVLAdapter.patch_tokens(tv.model.config)
    for j in range(cls_row.shape[0]):
        expected.index_add_(0, local + 4 * j, cls_row[j].mean(0))
    scores = cls_attention_scores(view)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)
    fallback = pooled([graph_of(vq) for vq in view.extras["vision_qk"][1]], view.num_tokens, received_attention)
    assert not torch.allclose(fallback, expected, atol=1e-3)  # negative control: the fallback signal differs


# ---- the token map and the projector reproduce the LM's visual inputs -------------------------------------
def test_token_map_and_projector_inputs_reproduce_the_visual_tokens(probe):
    tv = model(FAMILY)
    inputs = batch_inputs(tv, [0, 1])
    backbone = tv.model.model
    seen = {}
    h1 = backbone.vision_tower.register_forward_hook(lambda m, a, k, out: seen.update(vit=out.last_hidden_state),
                                                     with_kwargs=True)
    h2 = backbone.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(lm=k["inputs_embeds"]),
                                                           with_kwargs=True)
    try:
        with torch.no_grad(), vtprune.apply(tv.model, "_ivl_probe", keep=0.5):
            tv.model(**inputs)
    finally:
        h1.remove()
        h2.remove()
    ids, proj = inputs["input_ids"], backbone.multi_modal_projector
    local = InternVLAdapter.patch_tokens(tv.model.config)
    first = 0
    for view in probe.views:
        feats = seen["lm"][view.sample, ids[view.sample] == tv.model.config.image_token_id][:view.num_tokens]
        views = view.extras["vision_qk"][1]
        patches = seen["vit"][first:first + len(views), 1:]  # [views, P, C], [CLS] dropped
        gathered = torch.zeros(view.num_tokens, 4 * patches.shape[-1])
        for j, vq in enumerate(views):
            for t in vq.token_of_patch.unique():
                gathered[t] = patches[j][vq.token_of_patch == t].flatten()  # raster order = channel blocks
        with torch.no_grad():
            torch.testing.assert_close(proj(gathered), feats, atol=1e-6, rtol=1e-5)
            p = view.extras["projector"]
            assert p.inputs.shape == (view.num_tokens, 4, patches.shape[-1])
            assert p.mlp is not None and p.mlp.norm is proj.layer_norm  # the structure ZOO's estimator reads
            torch.testing.assert_close(p.inputs.flatten(1), gathered, atol=0, rtol=0)
            torch.testing.assert_close(p.project(p.inputs), feats, atol=1e-6, rtol=1e-5)
            # negative controls: the projector's LayerNorm cannot be skipped (an MLP-only projector is wrong), and
            # every view has its own token block (without the per-view offset tokens of later views are lost)
            assert not torch.allclose(proj.linear_2(proj.act(proj.linear_1(gathered))), feats, atol=1e-3)
            first_view_only = torch.stack([patches[0][local == t % 4].flatten() for t in range(view.num_tokens)])
            assert not torch.allclose(proj(first_view_only), feats, atol=1e-3)
        first += len(views)
    assert first == inputs["pixel_values"].shape[0]


# ---- InternVL3.5: the same tower and projector on a Qwen3 decoder (per-head q/k norms) ------------------------
@pytest.fixture(scope="module")
def qwen3_internvl():
    """The tiny InternVL with a Qwen3 decoder (InternVL3.5's LLM), eager attention, and the tiny processor."""
    from transformers import InternVLForConditionalGeneration

    config, _ = InternVLAdapter.tiny_parts(4)
    data = config.to_dict()
    data["text_config"].update(model_type="qwen3", head_dim=16)
    config = type(config)(**{k: v for k, v in data.items() if k != "model_type"})
    torch.manual_seed(0)
    m = InternVLForConditionalGeneration(config).eval()
    InternVLAdapter.tiny_weights(m)
    m.set_attn_implementation("eager")
    tv = model(FAMILY)
    m.generation_config.suppress_tokens = tv.model.generation_config.suppress_tokens  # never emit placeholders
    m.generation_config.pad_token_id = tv.model.generation_config.pad_token_id
    m.generation_config.bos_token_id = m.generation_config.eos_token_id = None
    return m, tv


def test_qwen3_decoder_llm_qk_is_the_eager_attention(qwen3_internvl):
    """FastV-style scores read layer K-1's q/k: on a Qwen3 decoder they need its per-head q/k norms."""
    m, tv = qwen3_internvl
    assert m.model.language_model.layers[0].self_attn.q_norm is not None
    inputs = batch_inputs(tv, [0, 1])
    seen = []

    class Probe(vtprune.Pruner):
        config_class = type("_ivl_llmConfig", (vtprune.UniformConfig,), {"name": "_ivl_llm"})
        needs = frozenset({"llm_qk"})

        def select(self, view, k):
            seen.append(view)
            return lattice(view.num_tokens, k)

    vtprune.register_pruner(Probe)
    try:
        with torch.no_grad(), vtprune.apply(m, "_ivl_llm", keep=0.5, site="layer", layer=2):
            m(**inputs)
    finally:
        del _REGISTRY["_ivl_llm"]
    with torch.no_grad():
        attn = m(**inputs, output_attentions=True).attentions[1]
    for view in seen:
        qk = view.extras["llm_qk"]
        real = inputs["attention_mask"][view.sample].bool()
        key = qk.key.repeat_interleave(qk.query.shape[0] // qk.key.shape[0], dim=0)
        got = ((qk.query[:, -1:] @ key.transpose(-1, -2)).squeeze(1) * qk.scaling).softmax(-1).mean(0)
        torch.testing.assert_close(got, attn[view.sample, :, -1][:, real].mean(0), atol=1e-6, rtol=1e-5)
    # negative control: Llama/Qwen2-style q/k (no per-head norms) from the same inputs miss the model's attention
    layer = m.model.language_model.layers[1].self_attn
    captured = {}
    h = layer.register_forward_pre_hook(lambda mod, a, k: captured.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            m(**inputs)
    finally:
        h.remove()
    hidden, (cos, sin) = captured["hidden_states"], captured["position_embeddings"]
    b, n, _ = hidden.shape
    with torch.no_grad():
        q = rotate(layer.q_proj(hidden).view(b, n, -1, layer.head_dim).transpose(1, 2), cos[:, None], sin[:, None])
        k = rotate(layer.k_proj(hidden).view(b, n, -1, layer.head_dim).transpose(1, 2), cos[:, None], sin[:, None])
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    plain = ((q[:, :, -1:] @ k.transpose(-1, -2)).squeeze(2) * layer.scaling).softmax(-1).mean(1)
    assert not torch.allclose(plain, attn[:, :, -1].mean(1), atol=1e-3)


@pytest.mark.parametrize("site", [{"site": "pre_llm"}, {"site": "layer", "layer": 2}])
def test_qwen3_decoder_prunes_exactly(qwen3_internvl, site):
    """Keep-all is bit-identical, and a pruned generation equals its own uncached run, on the Qwen3 decoder."""
    m, tv = qwen3_internvl
    inputs = batch_inputs(tv, [0, 1])
    gen = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        ref = m(**inputs).logits
        with vtprune.apply(m, "uniform", keep=1.0, **site):
            assert torch.equal(m(**inputs).logits, ref)
        with vtprune.apply(m, "fastv" if site["site"] == "layer" else "visionzip", keep=0.25, **site):
            cached = m.generate(**inputs, **gen)
            uncached = m.generate(**inputs, **gen, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- FLOPs -------------------------------------------------------------------------------------------------
def _image_side_flops(cfg, views: int, device: str) -> int:
    """FlopCounterMode over InternViT + pixel shuffle + projector, built from ``cfg`` on ``device``."""
    from transformers import AutoModel
    from transformers.models.internvl.modeling_internvl import (
        InternVLMultiModalProjector,
    )

    with torch.device(device):
        tower, proj = AutoModel.from_config(cfg.vision_config), InternVLMultiModalProjector(cfg)
        pixels = torch.randn(views, 3, *cfg.vision_config.image_size)
    rows, cols = InternVLAdapter.patch_grid(cfg)
    counter = F.flop_counter()
    with torch.no_grad(), counter:
        h = tower(pixel_values=pixels).last_hidden_state[:, 1:]
        proj(_shuffle(h.reshape(views, rows, cols, -1), cfg.downsample_ratio))
    return counter.get_total_flops()


@pytest.mark.parametrize("config", ["tiny", "internvl3-8b"])
def test_vision_flops_equal_the_flop_counter(config):
    """Exact on the tiny tower and, on the meta device, on the real InternVL3-8B (5 views of 448 px)."""
    cfg = model(FAMILY).model.config if config == "tiny" else B.load_config(B.resolve_model(config))
    views = 5
    measured = _image_side_flops(cfg, views, "cpu" if config == "tiny" else "meta")
    counted = InternVLAdapter.vision_flops(cfg, F.VisionWork(views=views))
    assert sum(counted.values()) == measured
    # negative control: the [CLS] token is part of every layer's work (s = patches + 1 tokens, not patches)
    vc = cfg.vision_config
    rows, cols = InternVLAdapter.patch_grid(cfg)
    c, s = vc.hidden_size, rows * cols + 1
    cls_share = views * vc.num_hidden_layers * (2 * (4 * c * c + 2 * c * vc.intermediate_size) + 4 * (2 * s - 1) * c)
    assert sum(counted.values()) - cls_share != measured


# ---- benchmark config, saved checkpoints, lmms-eval ---------------------------------------------------------
def test_real_config_and_synthetic_tiles():
    cfg = B.load_config(B.resolve_model("internvl3-8b"))
    dims = F.LLMDims.from_config(cfg)
    assert (dims.layers, dims.hidden, dims.kv_heads, dims.intermediate) == (28, 3584, 4, 18944)
    inputs = B.synthetic_inputs(cfg)  # default: 2x2 tiles + thumbnail
    assert inputs["pixel_values"].shape[:2] == (5, 3) and int((inputs["input_ids"] == cfg.image_token_id).sum()) == 1280
    tv = model(FAMILY)
    improc = tv.processor.image_processor
    for h, w in [(56, 56), (112, 56), (56, 112), (112, 112), (168, 56), (60, 290)]:  # the processor's own tiling
        views = improc.get_number_of_image_patches(h, w, {"max_patches": 12})
        assert InternVLAdapter.views_of((h, w), (56, 56)) == views
        image = InternVLAdapter.synthetic_image(tv.model.config, (h, w), torch.Generator().manual_seed(0))
        assert image.pixel_values.shape[0] == views and image.placeholders.numel() == 4 * views
    assert InternVLAdapter.tile_grid((56, 112), (56, 56)) == (1, 2)  # (rows, cols): a wide image is one row


def test_bench_cli_runs_saved_and_random_weight_models(tmp_path, capsys):
    """``vtprune bench`` on a saved InternVL folder and, with ``--random-weights``, on a config file (its synthetic
    image: 2x2 tiles + thumbnail)."""
    from vtprune.cli import main

    tv = model(FAMILY)
    tv.model.save_pretrained(tmp_path / "saved")
    config = tmp_path / "tiny-internvl.json"
    config.write_text(json.dumps(tv.model.config.to_dict()))
    common = ["--keep", "0.25", "--repeats", "1", "--warmup", "0", "--no-progress"]
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(config), "--random-weights", "--pruners", "visionzip", *common,
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["visual_before"], r["visual_after"]) for r in rows] == [(20, 20), (20, 5)]
    assert main(["bench", "--model", str(tmp_path / "saved"), *common]) == 0
    capsys.readouterr()


def test_lmms_eval_cli_runs_the_pruned_internvl_wrapper(tmp_path):
    """The stock lmms-eval CLI (through a sweep on the lmms_eval backend) runs ``vtprune_internvl_hf``: lmms-eval's
    InternVL-HF chat wrapper with the pruner installed."""
    pytest.importorskip("lmms_eval")
    from lmms_sweep import check_cells, lmms_sweep

    # the shapes task's images are 112 x 112: 2x2 tiles + thumbnail, 5 views of 2x2 tokens
    check_cells(lmms_sweep(tmp_path, FAMILY, keep=4), "vtprune_internvl_hf", before=20, after=4)
