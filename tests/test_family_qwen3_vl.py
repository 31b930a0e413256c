"""Qwen3-VL only: DeepStack features follow the kept tokens pre-LLM and in-LLM with K before, inside and after
the DeepStack layers (each against a hand-built reference from stock modules, with negative controls that leave
the features ungathered); interleaved M-RoPE positions as on the full sequence, also the 4 rows of ``generate``;
``llm_qk`` against the attention module's own weights (q_norm/k_norm before RoPE); the MoE variant through the same
adapter (exactness, FLOPs); a local checkpoint folder loads and prunes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import transformers
from conftest import batch_inputs, model

import vtprune
from vtprune import flops as F
from vtprune.capture import InputCapture, rotate
from vtprune.models import ModelAdapter, adapter_for
from vtprune.models.qwen3_vl import Qwen3VLAdapter, gather_deepstack
from vtprune.ops import lattice
from vtprune.plan import KeepPlan
from vtprune.testing import TinyVLM, random_image, shortened_lm_inputs
from vtprune.view import ImageLayout, Segment

FAMILY = "qwen3_vl"
LEVELS = 3  # the tiny model's DeepStack levels: added after decoder layers 0, 1, 2 (of 4)


@functools.lru_cache(maxsize=None)
def moe_model() -> TinyVLM:
    """The tiny Qwen3-VL-MoE (4 experts, top 2), built through the same adapter."""
    torch.manual_seed(0)
    config, proc = Qwen3VLAdapter.tiny_parts(4, moe=True)
    m = transformers.Qwen3VLMoeForConditionalGeneration(config).eval()
    tok = proc.tokenizer
    m.generation_config.suppress_tokens = sorted(i for t, i in tok.get_vocab().items()
                                                 if t.startswith("<") and i != tok.pad_token_id)
    m.generation_config.pad_token_id = tok.pad_token_id
    m.generation_config.bos_token_id = m.generation_config.eos_token_id = None
    return TinyVLM(model=m, processor=proc, family=FAMILY)


def _tv(variant: str) -> TinyVLM:
    return moe_model() if variant == "moe" else model(FAMILY)


def _inputs(tv, variant: str) -> dict:
    """One sample; ``video``: an image then a 4-frame video, whose DeepStack rows interleave with the image's in
    the joint features (video tokens are never pruned)."""
    if variant != "video":
        return batch_inputs(tv, [1])
    frames = [np.asarray(random_image(10 + i, (56, 56))) for i in range(4)]
    prompt = ("<|im_start|> user <|vision_start|> <|image_pad|> <|vision_end|> <|vision_start|> <|video_pad|> "
              "<|vision_end|> describe <|im_end|> <|im_start|> assistant")
    return dict(tv.processor(text=[prompt], images=[random_image(1, (112, 56))], videos=[frames],
                             return_tensors="pt", videos_kwargs={"do_sample_frames": False}))


def _capture(module: torch.nn.Module, run) -> tuple[tuple, dict]:
    seen: list = []
    h = module.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))) if not seen else None,
                                         with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        h.remove()
    return seen[0]


def _keep(tv, inputs, keep: float = 0.4) -> torch.Tensor:
    """Sequence indices the 'uniform' pruner keeps in a one-row batch with one image or one video: text + a lattice
    of the item's tokens (a video is one item, its budget on the whole video)."""
    ids = inputs["input_ids"][0]
    keep_mask = torch.ones_like(ids, dtype=torch.bool)
    for token in (tv.model.config.image_token_id, tv.model.config.video_token_id):
        item = (ids == token).nonzero().flatten()
        if n := item.numel():
            keep_mask[item] = False
            keep_mask[item[lattice(n, max(1, int(keep * n + 0.5))).indices]] = True
    return keep_mask.nonzero().flatten()


def _kept_deepstack(lm_kw: dict, keep: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """By hand: the visual mask's kept columns and each level's rows of the kept visual tokens."""
    short = shortened_lm_inputs(lm_kw, keep)
    return short["visual_pos_masks"], short["deepstack_visual_embeds"]


def _run(tv, inputs, **kw) -> torch.Tensor:
    with torch.no_grad(), vtprune.apply(tv.model, "uniform", keep=0.4, **kw) as handle:
        out = tv.model(**inputs).logits
        assert handle.stats.visual_after != handle.stats.visual_before
    return out


# ---- DeepStack, pre-LLM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dense", "moe", "video"])
def test_pre_llm_gathers_every_deepstack_level(variant):
    tv = _tv(variant)
    inputs = _inputs(tv, variant)
    lm = tv.model.model.language_model
    _, lm_kw = _capture(lm, lambda: tv.model(**inputs))
    assert len(lm_kw["deepstack_visual_embeds"]) == LEVELS
    keep = _keep(tv, inputs)
    mask, levels = _kept_deepstack(lm_kw, keep)
    embeds, pos = lm_kw["inputs_embeds"][:, keep], lm_kw["position_ids"][..., keep]

    def reference(vis_mask, deepstack):
        with torch.no_grad():
            h = lm(inputs_embeds=embeds, position_ids=pos, visual_pos_masks=vis_mask,
                   deepstack_visual_embeds=deepstack).last_hidden_state
        return tv.model.lm_head(h)

    hooked = _run(tv, inputs)
    torch.testing.assert_close(hooked, reference(mask, levels), atol=1e-6, rtol=1e-6)
    # negative controls: the first rows of each level (left ungathered), or no DeepStack at all, differ
    n = int(mask.sum())
    assert (reference(mask, [e[:n] for e in lm_kw["deepstack_visual_embeds"]]) - hooked).abs().max() > 1e-3
    assert (reference(None, None) - hooked).abs().max() > 1e-3


def test_pre_llm_without_the_gather_fails(monkeypatch):
    """Negative control of the adapter hook itself: with ``gather_lm_inputs`` a no-op, the language model adds
    full-length DeepStack features to the pruned sequence and fails."""
    tv = model(FAMILY)
    inputs = batch_inputs(tv, [1])
    monkeypatch.setattr(Qwen3VLAdapter, "gather_lm_inputs", ModelAdapter.gather_lm_inputs)
    with pytest.raises((IndexError, RuntimeError)):
        _run(tv, inputs)


def test_gather_deepstack_is_row_major_on_the_repadded_layout():
    """Two ragged rows re-padded on the left: the kept features come out in row-major order of the new mask."""
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    levels = [torch.arange(5.0)[:, None] * 10 + torch.arange(2.0)]  # visual token r has features (10r, 10r+1)
    keep = torch.tensor([[1, 0, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)  # row 1 had a padding slot 0
    plan = KeepPlan.from_keep_mask(keep)
    new_mask, (kept,) = gather_deepstack(mask, levels, plan)
    # row 0 keeps tokens 0, 2, 3, 4 (visual: 2 -> r1, 3 -> r2); row 1 keeps 1, 2, 3 (visual: 1 -> r4), left-padded
    assert new_mask.tolist() == [[False, True, True, False], [False, True, False, False]]
    assert kept[:, 0].tolist() == [10.0, 20.0, 40.0]
    # negative control: ignoring the re-padding (plain column gather per row) puts row 1's token elsewhere
    assert not torch.equal(new_mask, mask.gather(1, plan.index))


# ---- DeepStack, in-LLM at K ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,K", [("dense", 1), ("dense", 2), ("dense", 3), ("moe", 1), ("video", 1)],
                         ids=["K1-inside", "K2-inside", "K3-after", "moe-K1", "video-K1"])
def test_layer_site_deepstack_before_inside_after(variant, K):
    tv = _tv(variant)
    inputs = _inputs(tv, variant)
    lm = tv.model.model.language_model
    _, lm_kw = _capture(lm, lambda: tv.model(**inputs))
    (hidden_k,), _ = _capture(lm.layers[K], lambda: tv.model(**inputs))
    keep = _keep(tv, inputs)
    mask, levels = _kept_deepstack(lm_kw, keep)
    n = keep.numel()
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]

    def tail(add_deepstack: bool) -> torch.Tensor:
        with torch.no_grad():
            h = hidden_k[:, keep]
            pe = lm.rotary_emb(h, lm_kw["position_ids"][..., keep])
            for i, layer in enumerate(lm.layers[K:], K):
                h = layer(h, attention_mask=causal, position_embeddings=pe, position_ids=None)
                if add_deepstack and i < LEVELS:
                    h = lm._deepstack_process(h, mask, levels[i])
            return tv.model.lm_head(lm.norm(h))

    with torch.no_grad(), vtprune.apply(tv.model, "uniform", keep=0.4, site="layer", layer=K):
        patched = "_deepstack_process" in lm.__dict__
        hooked = tv.model(**inputs).logits
    assert patched == (K < LEVELS)  # the wrapper is there only when layers >= K get DeepStack features
    assert "_deepstack_process" not in lm.__dict__  # remove() takes it out again
    torch.testing.assert_close(hooked, tail(True), atol=1e-5, rtol=1e-5)
    if K < LEVELS:  # negative control: the layers after K do receive (gathered) DeepStack features
        assert (tail(False) - hooked).abs().max() > 1e-3


def test_layer_site_without_the_wrapper_fails(monkeypatch):
    """Negative control of the in-LLM hook: K=1 without the ``_deepstack_process`` wrapper indexes the pruned
    hidden states with the full-length visual mask and fails."""
    tv = model(FAMILY)
    inputs = batch_inputs(tv, [1])
    monkeypatch.setattr(Qwen3VLAdapter, "follow_layer_plan", ModelAdapter.follow_layer_plan)
    with pytest.raises((IndexError, RuntimeError)):
        _run(tv, inputs, site="layer", layer=1)


@pytest.mark.parametrize("K", [1, 3])
def test_layer_site_batch_equals_single_rows(K):
    """A left-padded ragged batch, pruned at K inside / after DeepStack, equals each row run alone."""
    tv = model(FAMILY)
    batch = batch_inputs(tv, [0, 1])
    with torch.no_grad(), vtprune.apply(tv.model, "uniform", keep=0.4, site="layer", layer=K):
        out = tv.model(**batch).logits
        for row in range(2):
            single = tv.model(**batch_inputs(tv, [row])).logits[0]
            torch.testing.assert_close(out[row, -single.shape[0]:], single, atol=1e-5, rtol=1e-5)


# ---- positions ----------------------------------------------------------------------------------------------
def test_generate_keeps_the_four_position_rows():
    """``generate`` passes [text, t, h, w]: pruned, the language model gets those rows of the kept tokens (the
    3-row forward is checked by tests/test_core_reference.py::test_qwen_kept_positions_are_full_sequence_mrope)."""
    tv = model(FAMILY)
    inputs = batch_inputs(tv, [0])
    lm = tv.model.model.language_model
    _, full = _capture(lm, lambda: tv.model.generate(**inputs, max_new_tokens=1, do_sample=False))
    keep = _keep(tv, inputs, 0.25)
    with vtprune.apply(tv.model, "uniform", keep=0.25):
        _, gen = _capture(lm, lambda: tv.model.generate(**inputs, max_new_tokens=1, do_sample=False))
    assert full["position_ids"].shape[0] == 4 and torch.equal(gen["position_ids"], full["position_ids"][..., keep])
    assert not torch.equal(gen["position_ids"][0], gen["position_ids"][1])  # the text row is not an M-RoPE row


# ---- signals --------------------------------------------------------------------------------------------------
def test_llm_qk_reproduces_the_attention_weights():
    """llm_qk (q_norm/k_norm, then interleaved M-RoPE) gives exactly the eager attention's softmax weights."""
    tv = model(FAMILY, "eager")
    inputs = batch_inputs(tv, [1])
    adapter = adapter_for(tv.model)
    layer = 1
    attn = adapter.llm_attention(layer)
    cap, weights = InputCapture(armed=True), []
    h1 = attn.register_forward_pre_hook(cap, with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, out: weights.append(out[1]))
    try:
        with torch.no_grad():
            tv.model(**inputs)
    finally:
        h1.remove()
        h2.remove()
    L = weights[0].shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()

    def probs(q, k, scaling):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return ((q @ k.transpose(-1, -2)) * scaling).masked_fill(~causal, float("-inf")).softmax(-1)

    with torch.no_grad():
        ours = probs(*adapter.llm_qk(layer, cap))
        hidden, (cos, sin) = cap.tensor("hidden_states"), cap.tensor("position_embeddings", 1)
        b, n, _ = hidden.shape
        q, k = (proj(hidden).view(b, n, -1, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
        plain = probs(rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None]), attn.scaling)
    torch.testing.assert_close(ours, weights[0], atol=1e-5, rtol=1e-5)
    assert (plain - weights[0]).abs().max() > 1e-3  # negative control


def test_projector_inputs_reproduce_the_merged_tokens():
    """The 2x2 patch groups the adapter hands to [projector]-reading methods map, through the merger, onto
    exactly the visual tokens of each image (block-major patch order, as Qwen2-VL)."""
    tv = model(FAMILY)
    inputs = batch_inputs(tv, [0, 1])
    adapter = adapter_for(tv.model)
    tower, proj = InputCapture(armed=True), InputCapture(armed=True)
    handles = [adapter.vision_tower.register_forward_pre_hook(tower, with_kwargs=True),
               adapter.projector.register_forward_pre_hook(proj, with_kwargs=True)]
    try:
        with torch.no_grad():
            feats = tv.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    finally:
        for h in handles:
            h.remove()
    m = tv.model.config.vision_config.spatial_merge_size
    layouts = [ImageLayout((Segment(int(h) // m, int(w) // m),)) for _, h, w in inputs["image_grid_thw"].tolist()]
    with torch.no_grad():
        for got, ref in zip(adapter.projector_inputs(proj, tower, layouts), feats):
            torch.testing.assert_close(got.project(got.inputs), ref, atol=1e-6, rtol=1e-6)


# ---- MoE ------------------------------------------------------------------------------------------------------
def test_moe_variant_uses_the_same_adapter_keep_all_and_cache():
    tv = moe_model()
    adapter = adapter_for(tv.model)
    assert type(adapter) is Qwen3VLAdapter and type(tv.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    inputs = batch_inputs(tv, [0, 1])
    gen = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = tv.model.generate(**inputs, **gen)
    for site in ({"site": "pre_llm"}, {"site": "layer", "layer": 1}):
        with vtprune.apply(tv.model, "uniform", keep=1.0, **site):
            out = tv.model.generate(**inputs, **gen)
        assert torch.equal(out.sequences, ref.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
        with vtprune.apply(tv.model, "uniform", keep=0.4, **site):
            cached = tv.model.generate(**inputs, **gen)
            uncached = tv.model.generate(**inputs, **gen, use_cache=False)
        assert torch.equal(cached.sequences, uncached.sequences)
        torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [None, {"site": "pre_llm"}, {"site": "layer", "layer": 1}],
                         ids=["unpruned", "pre_llm", "layer1"])
def test_moe_flops_match_the_flop_counter(case):
    """Routed experts (top-k per token) and the router counted as they run; DeepStack mergers in the projector."""
    tv = moe_model()
    inputs = batch_inputs(tv, [0])
    if case is None:
        measured = F.measured_flops(lambda: tv.model(**inputs))
        report = F.flops_unpruned(tv.model, inputs, logits_to_keep=0)
    else:
        with vtprune.apply(tv.model, "random", keep=0.5, **case) as handle:
            measured = F.measured_flops(lambda: tv.model(**inputs))
            report = F.flops_from_stats(tv.model, handle.stats, inputs=inputs, logits_to_keep=0)
    assert report.prefill_total == measured, (report.prefill, measured)


def test_vision_flops_count_the_deepstack_mergers():
    config = model(FAMILY).model.config
    work = F.VisionWork(grids=((1, 8, 8),))
    with_ds = Qwen3VLAdapter.vision_flops(config, work)

    class NoDeepStack(Qwen3VLAdapter):
        deepstack = False

    without = NoDeepStack.vision_flops(config, work)
    assert with_ds["vision"] == without["vision"] and with_ds["projector"] == (1 + LEVELS) * without["projector"]


def test_shipped_config_is_qwen3_vl_8b():
    """configs/models/qwen3-vl-8b.json builds Qwen3-VL-8B's 8.77 B parameters (on the meta device) and its
    synthetic benchmark prompt holds 576 visual tokens (768 px, 16-px patches); a size off the 32-px grid rounds."""
    from vtprune import benchmark as B

    config = B.load_config(B.resolve_model("qwen3-vl-8b"))
    with torch.device("meta"):
        shell = transformers.Qwen3VLForConditionalGeneration(config)
    assert round(sum(p.numel() for p in shell.parameters()) / 1e9, 2) == 8.77
    assert Qwen3VLAdapter.deepstack_levels(config) == 3
    inputs = B.synthetic_inputs(config)
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 576
    assert inputs["image_grid_thw"].tolist() == [[1, 48, 48]]
    odd = B.synthetic_inputs(config, image_size=(112, 56))
    assert odd["image_grid_thw"].tolist() == [[1, 8, 4]]


# ---- loading ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_a_saved_checkpoint_folder_loads_and_prunes(variant, tmp_path):
    """save_pretrained -> vtprune's loading path (local files only) -> the same model class and logits; prunes."""
    from vtprune.benchmark import build_model

    tv = _tv(variant)
    tv.model.save_pretrained(tmp_path)
    loaded = build_model(str(tmp_path))
    assert type(loaded) is type(tv.model)
    inputs = batch_inputs(tv, [0])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, tv.model(**inputs).logits)
    with torch.no_grad(), vtprune.apply(loaded, "uniform", keep=0.25, site="layer", layer=1) as handle:
        loaded(**inputs)
        assert handle.stats.visual_after == [4]


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_bench_cli_runs_random_weight_and_saved_models(variant, tmp_path, capsys):
    """``vtprune bench`` with ``--random-weights`` on a config file (pruned at K=1, inside DeepStack) and on a saved
    folder, for both model classes."""
    import json

    from vtprune.cli import main

    tv = _tv(variant)
    config = tmp_path / f"tiny-{variant}.json"
    config.write_text(json.dumps(tv.model.config.to_dict()))
    tv.model.save_pretrained(tmp_path / "saved")
    common = ["--keep", "0.25", "--repeats", "1", "--warmup", "0", "--no-progress", "--image-size", "256x128"]
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(config), "--random-weights", "--pruners", "uniform", "--site", "layer",
                 "--layer", "1", *common, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["visual_before"], r["visual_after"]) for r in rows] == [(32, 32), (32, 8)]
    assert main(["bench", "--model", str(tmp_path / "saved"), *common]) == 0
    capsys.readouterr()


# ---- lmms-eval ----------------------------------------------------------------------------------------------------
def test_lmms_eval_cli_runs_the_pruned_qwen3_vl_wrapper(tmp_path):
    """The stock lmms-eval CLI (through a sweep on the lmms_eval backend) runs ``vtprune_qwen3_vl``: lmms-eval's
    Qwen3-VL wrapper (which resizes images for 16-px patches) with the pruner installed."""
    pytest.importorskip("lmms_eval")
    from lmms_sweep import lmms_sweep

    (base, base_results), (pruned, pruned_results) = lmms_sweep(tmp_path, FAMILY, keep=4)
    for record, results, after in ((base, base_results, None), (pruned, pruned_results, 4)):
        assert record["status"] == "ok", record.get("error")
        assert results["config"]["model"] == "vtprune_qwen3_vl"
        throughput = results["throughput"]
        before = throughput["avg_vtprune_visual_before"]
        assert before > 0 and throughput["avg_vtprune_visual_after"] == (before if after is None else after)
    assert pruned["lmms_eval"]["command"].startswith("lmms-eval --model vtprune_qwen3_vl --model_args pretrained=")
