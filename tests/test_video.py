"""Video tokens are pruned exactly (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, LLaVA-OneVision), at both sites, alone and mixed with images.

Each video is one item for the methods, laid out as one grid per temporal group. The properties are those of the
image suite: keep-all identity, pruned == the unhooked model on the hand-shortened input with the full-sequence
M-RoPE positions (negative control: renumbered positions differ), cached == uncached, batch == single, a later text
turn on the pruned cache, and every registered method either keeps its budget on a video or refuses by name.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import vtprune
import vtprune.benchmark as B
import vtprune.flops as F
from conftest import GEN, SITES, model
from vtprune.errors import VTPruneError
from vtprune.testing import random_image, shortened_lm_inputs
from vtprune.view import ImageLayout, Segment, budget, frame_budgets

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
FAMILIES = (*QWEN, "llava_onevision")
CASES = [(f, s) for f in FAMILIES for s in SITES]
IDS = [f"{f}-{s['site']}" for f, s in CASES]
#: per sample: the prompt's items in order, and the frame size (w, h) of its videos
PROMPTS = {0: (["video"], (84, 56)), 1: (["image", "video"], (56, 84)), 2: (["image"], None),
           3: (["video", "video"], (56, 56))}
QUESTIONS = ["what is the colour of the small circle", "how many", "is there a red square on the left",
             "what is in the picture"]


def _video(seed: int, size: tuple[int, int], frames: int = 4) -> np.ndarray:
    """``frames`` noise frames of ``size`` (w, h): ``frames / 2`` temporal groups."""
    rng = np.random.default_rng(100 + seed)
    return rng.integers(0, 256, (frames, size[1], size[0], 3), dtype=np.uint8)


def video_inputs(tv, samples: list[int]) -> dict:
    """A left-padded batch of the given samples of :data:`PROMPTS`; Qwen2.5-VL videos at 2 s per temporal group
    (temporal M-RoPE ids 8 apart), so that the temporal ids are not the group indices."""
    prompts, images, videos = [], [], []
    for s in samples:
        items, size = PROMPTS[s]
        content = [{"type": kind} for kind in items] + [{"type": "text", "text": QUESTIONS[s]}]
        prompts.append(tv.processor.apply_chat_template([{"role": "user", "content": content}],
                                                        add_generation_prompt=True))
        images += [random_image(s, (56, 112))] * items.count("image")
        videos += [_video(s + j, size) for j in range(items.count("video"))]
    inputs = dict(tv.processor(text=prompts, images=images or None, videos=videos or None, return_tensors="pt",
                               padding=True))
    if "second_per_grid_ts" in inputs:
        inputs["second_per_grid_ts"] = torch.full_like(inputs["second_per_grid_ts"], 2.0)
    return inputs


def _generate(tv, inputs, **kw):
    out = tv.model.generate(**inputs, **{**GEN, **kw})
    return out.sequences, torch.stack(out.logits, 1)


def _record(handle) -> list:
    """Wrap the handle's pruner so that every (view, selection) it makes is recorded."""
    seen: list = []
    select = handle.pruner.select

    def spy(view, k):
        sel = select(view, k)
        seen.append((view, sel))
        return sel
    handle.pruner.select = spy
    return seen


def _items(tv, inputs: dict) -> list[torch.Tensor]:
    """Sequence positions of each image (a contiguous placeholder run) and each video (its ``video_grid_thw``
    count of placeholders, split by timestamps in Qwen3-VL) of a one-row prompt, in order."""
    cfg, ids = tv.model.config, inputs["input_ids"][0]
    img = (ids == cfg.image_token_id).nonzero().flatten()
    breaks = ((img[1:] - img[:-1]) != 1).nonzero().flatten() + 1
    vid = (ids == cfg.video_token_id).nonzero().flatten()
    if "video_grid_thw" in inputs:
        m2 = cfg.vision_config.spatial_merge_size ** 2
        counts = [int(g.prod()) // m2 for g in inputs["video_grid_thw"]]
    else:  # LLaVA-OneVision: frames x the pooled grid (half the patch grid, rounded up), then one newline
        side = -(-cfg.vision_config.image_size // cfg.vision_config.patch_size // 2)
        videos = inputs.get("pixel_values_videos", torch.zeros(0, 0))
        counts = [videos.shape[1] * side * side + 1] * videos.shape[0]
    items = list(torch.tensor_split(img, breaks.tolist())) if img.numel() else []
    return sorted(items + list(torch.split(vid, counts)), key=lambda p: int(p[0]))


def _capture_lm(tv, inputs: dict) -> dict:
    """The keyword inputs the unhooked language model gets."""
    seen: list = []
    h = tv.model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(dict(k)) if not seen else None, with_kwargs=True)
    try:
        tv.model(**inputs)
    finally:
        h.remove()
    return seen[0]


def _full_positions(lm_kw: dict) -> torch.Tensor:
    """[A, 1, L] positions the unhooked language model used: Qwen's (t, h, w) rows, or 1-D indices."""
    pos = lm_kw.get("position_ids")
    if pos is None:
        return torch.arange(lm_kw["inputs_embeds"].shape[1]).view(1, 1, -1)
    return pos[None] if pos.dim() == 2 else pos[-3:]


def test_video_layout_frames_and_grid():
    """A video item's layout has one grid per temporal group: 4 frames of 56x84 px -> 2 groups of 2x3 tokens
    (LLaVA-OneVision: 4 frames of 2x2 pooled tokens, then a newline outside every frame)."""
    tv = model("llava_onevision")
    with vtprune.apply(tv.model, "random", keep=1000) as handle:
        seen = _record(handle)
        tv.model(**video_inputs(tv, [0]))
    (video,) = [view.layout for view, _ in seen]
    assert video.is_video and video.num_frames == 4 and video.size == 17
    assert video.frame_index().tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [-1]
    for family in QWEN:
        tv = model(family)
        with vtprune.apply(tv.model, "random", keep=1000) as handle:
            seen = _record(handle)
            tv.model(**video_inputs(tv, [1]))
        layouts = [view.layout for view, _ in seen]
        assert [lay.is_video for lay in layouts] == [False, True]
        video = layouts[1]
        assert video.num_frames == 2 and video.size == 12 and {(s.rows, s.cols) for s in video.segments} == {(3, 2)}
        assert video.frame_index().tolist() == [0] * 6 + [1] * 6


@pytest.mark.parametrize("family,site", CASES, ids=IDS)
def test_keep_all_is_identity(family, site):
    tv = model(family)
    inputs = video_inputs(tv, [0, 1])
    ref_logits = tv.model(**inputs).logits
    ref_seq, ref_step = _generate(tv, inputs)
    for keep in (1.0, 10_000):  # no pruner runs / select runs on every item with k = V
        with vtprune.apply(tv.model, "random", keep=keep, **site) as handle:
            seen = _record(handle)
            assert torch.equal(tv.model(**inputs).logits, ref_logits)
            assert len(seen) == (0 if isinstance(keep, float) else 3)  # row 0: a video; row 1: an image, a video
            seq, step = _generate(tv, inputs)
            assert torch.equal(seq, ref_seq) and torch.equal(step, ref_step)
            assert handle.stats.visual_before == handle.stats.visual_after


def _reference_case(family: str, attn: str, sample: int, keep: float):
    """(inputs, unhooked LM inputs, kept sequence indices, hooked logits) of one pruned prompt, pre-LLM."""
    tv = model(family, attn)
    inputs = video_inputs(tv, [sample])
    with vtprune.apply(tv.model, "random", keep=keep) as handle:
        seen = _record(handle)
        hooked = tv.model(**inputs).logits
    items = _items(tv, inputs)
    assert len(items) == len(seen)
    keep_mask = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    for pos, (view, sel) in zip(items, seen):
        assert view.num_tokens == pos.numel()
        keep_mask[pos] = False
        keep_mask[pos[sel.indices]] = True
    return tv, inputs, keep_mask.nonzero().flatten(), hooked


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sample", [1, 3])
def test_pre_llm_matches_hand_shortened_input(family, attn, sample):
    """Pruned logits == the stock language model on the kept tokens with their full-sequence (t, h, w) ids
    (LLaVA-OneVision: their 1-D indices)."""
    tv, inputs, keep, hooked = _reference_case(family, attn, sample, 0.4)
    lm_kw = _capture_lm(tv, inputs)
    full = _full_positions(lm_kw)
    if family in QWEN:
        rope, _ = tv.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs["video_grid_thw"],
            attention_mask=inputs["attention_mask"],
            **({"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}))
        assert torch.equal(full, rope)
    embeds, n = lm_kw["inputs_embeds"][:, keep], keep.numel()
    lm, ones = tv.model.model.language_model, torch.ones(1, n, dtype=torch.long)
    deepstack = shortened_lm_inputs(lm_kw, keep)  # Qwen3-VL: the kept visual tokens' DeepStack features

    def logits(pos: torch.Tensor) -> torch.Tensor:
        return tv.model.lm_head(lm(inputs_embeds=embeds, position_ids=pos[0] if pos.shape[0] == 1 else pos,
                                   attention_mask=ones,
                                   **deepstack).last_hidden_state)

    torch.testing.assert_close(hooked, logits(full[..., keep]), atol=1e-6, rtol=1e-6)
    if family == "qwen2_5_vl":  # second_per_grid_ts spaces the groups 8 ids apart: the plain index is wrong
        vid = inputs["input_ids"][0] == tv.model.config.video_token_id
        assert set(full[0, 0, vid].unique().tolist()) >= {full[0, 0, vid].min().item() + 8}
    wrong = torch.arange(n).expand(full.shape[0], 1, -1)  # negative control: renumbered positions
    assert (logits(wrong) - hooked).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_site_matches_hand_shortened_tail(family):
    """In-LLM at K: layers >= K on layer K's input states of the kept tokens, with their full-sequence ids."""
    K, attn = 2, "sdpa"
    tv = model(family, attn)
    inputs = video_inputs(tv, [1])
    lm = tv.model.model.language_model
    seen_k: list = []
    h = lm.layers[K].register_forward_pre_hook(lambda m, a, k: seen_k.append(a[0] if a else k["hidden_states"]),
                                               with_kwargs=True)
    try:
        lm_kw = _capture_lm(tv, inputs)
    finally:
        h.remove()
    with vtprune.apply(tv.model, "random", keep=0.4, site="layer", layer=K) as handle:
        seen = _record(handle)
        hooked = tv.model(**inputs).logits
    keep_mask = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    for pos, (_, sel) in zip(_items(tv, inputs), seen):
        keep_mask[pos] = False
        keep_mask[pos[sel.indices]] = True
    keep = keep_mask.nonzero().flatten()
    n = keep.numel()
    assert n < keep_mask.numel()
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]

    deepstack = shortened_lm_inputs(lm_kw, keep)  # Qwen3-VL: DeepStack levels still to add after layers K..
    levels = deepstack.get("deepstack_visual_embeds", [])
    recurrent = vtprune.models.adapter_for(tv.model).recurrent_layers  # Qwen3.5

    def tail(pos: torch.Tensor) -> torch.Tensor:
        x = seen_k[0][:, keep]
        pe = lm.rotary_emb(x, pos[0] if pos.shape[0] == 1 else pos)
        for i, layer in enumerate(lm.layers[K:], K):  # linear-attention layers take no 4-D mask
            x = layer(x, attention_mask=None if i in recurrent else causal, position_embeddings=pe, position_ids=None)
            if i < len(levels):
                x = lm._deepstack_process(x, deepstack["visual_pos_masks"], levels[i])
        return tv.model.lm_head(lm.norm(x))

    full = _full_positions(lm_kw)
    torch.testing.assert_close(hooked, tail(full[..., keep]), atol=1e-5, rtol=1e-5)
    assert (tail(torch.arange(n).expand(full.shape[0], 1, -1)) - hooked).abs().max() > 1e-3  # negative control


@pytest.mark.parametrize("family,site", CASES, ids=IDS)
def test_cached_equals_uncached_and_batch_equals_single(family, site):
    """A batch mixing a video-only row, an image+video row and an image-only row."""
    tv = model(family)
    samples = [0, 1, 2]
    inputs = video_inputs(tv, samples)
    with vtprune.apply(tv.model, "random", keep=0.3, **site) as handle:
        seq_c, step_c = _generate(tv, inputs)
        assert handle.stats.visual_after < handle.stats.visual_before
        seq_u, step_u = _generate(tv, inputs, use_cache=False)
        assert torch.equal(seq_c, seq_u)
        torch.testing.assert_close(step_c, step_u, atol=1e-5, rtol=1e-5)
        batch_logits = tv.model(**inputs).logits
        for row, s in enumerate(samples):
            single = video_inputs(tv, [s])
            torch.testing.assert_close(batch_logits[row, -1], tv.model(**single).logits[0, -1], atol=1e-5, rtol=1e-5)
            seq_s, _ = _generate(tv, single)
            assert torch.equal(seq_s[0, -GEN["max_new_tokens"]:], seq_c[row, -GEN["max_new_tokens"]:])


@pytest.mark.parametrize("family,site", CASES, ids=IDS)
def test_later_text_turn_on_pruned_cache(family, site):
    """A second text turn continuing the pruned cache == the whole conversation run at once, hooked (the random
    pruner draws the same subset for the same item either way)."""
    tv = model(family)
    first = video_inputs(tv, [1])
    step = {"do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with vtprune.apply(tv.model, "random", keep=0.4, **site):
        out = tv.model.generate(**first, max_new_tokens=3, **step)
        turn = tv.processor(text=[tv.prompt("and what colour is it", 0)], return_tensors="pt")
        ids = torch.cat([out.sequences, turn["input_ids"]], 1)
        whole = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "mm_token_type_ids" in first:  # Qwen's M-RoPE index
            whole["mm_token_type_ids"] = torch.cat(
                [first["mm_token_type_ids"], torch.zeros(1, ids.shape[1] - first["input_ids"].shape[1],
                                                         dtype=torch.long)], 1)
        pixels = {k: first[k] for k in ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images",
                                        "pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in first}
        later = tv.model.generate(**whole, past_key_values=out.past_key_values, max_new_tokens=3, **step)
        one_pass = tv.model.generate(**whole, **pixels, max_new_tokens=3, **step)
    assert torch.equal(later.sequences, one_pass.sequences)
    torch.testing.assert_close(torch.stack(later.logits, 1), torch.stack(one_pass.logits, 1), atol=1e-5, rtol=1e-5)


def test_int_budget_is_per_video():
    tv = model("qwen2_vl")
    with vtprune.apply(tv.model, "random", keep=5) as handle:
        tv.model(**video_inputs(tv, [3]))
        assert handle.stats.samples[0].images == [(8, 5), (8, 5)]  # two 56x56 videos of 2 groups of 2x2 tokens


PRUNERS = [name for name in vtprune.list_pruners() if not name.startswith("_")]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("pruner", PRUNERS)
def test_every_pruner_runs_on_a_video(pruner, family):
    """Every registered method keeps its budget on a video (next to an image) at its default site, or refuses
    the video with an error that names it."""
    tv = model(family)
    inputs = video_inputs(tv, [1])
    with vtprune.apply(tv.model, "random", keep=1.0) as probe:
        tv.model(**inputs)
        sizes = [before for before, _ in probe.stats.samples[0].images]
    try:
        with vtprune.apply(tv.model, pruner, keep=0.5) as handle:
            if "hints" in handle.pruner.needs:
                handle.set_hints([{"token_priority": {"question": [[j % 3 for j in range(v)] for v in sizes]}}])
            tv.model(**inputs)
            kept = [after for _, after in handle.stats.samples[0].images]
    except VTPruneError as err:
        assert family == "llava_onevision" and "video" in str(err), f"{pruner}: {err}"
        return
    assert kept == [budget(0.5, v) for v in sizes], f"{pruner}: kept {kept} of {sizes}"


def test_frame_budgets_largest_remainder():
    """Frames of different sizes, and budgets not divisible by the number of frames."""
    equal = ImageLayout.video(Segment(2, 3), 4)
    assert frame_budgets(5, equal) == [2, 1, 1, 1]  # 5/4 each: the leftover token goes to the first frame
    assert frame_budgets(24, equal) == [6] * 4 and frame_budgets(100, equal) == [6] * 4
    ragged = ImageLayout((Segment(2, 2), Segment(3, 3), Segment(1, 0, newline=True)), (0, 1, -1))
    assert frame_budgets(7, ragged) == [2, 5]  # quotas 2.15 / 4.85
    assert frame_budgets(6, ragged) == [2, 4]  # quotas 1.85 / 4.15


@pytest.mark.parametrize("pruner,site", [("random", SITES[0]), ("random", SITES[1]), ("visionzip", SITES[0]),
                                          ("pool", SITES[0]), ("dart", SITES[1])])
def test_per_frame_budget_keeps_each_frames_share(pruner, site):
    """per_frame=True: every temporal group keeps its share of the video's budget, the method seeing each frame
    alone as an image (vision-encoder, decoder q/k and projector signals restricted to the frame)."""
    tv = model("qwen2_5_vl")
    inputs = video_inputs(tv, [1])
    with vtprune.apply(tv.model, pruner, keep=0.5, per_frame=True, **site) as handle:
        seen = _record(handle)
        logits = tv.model(**inputs).logits
        assert [after for _, after in handle.stats.samples[0].images] == [4, 6]
    frames = [view for view, _ in seen if view.num_tokens == 6]
    assert len(frames) == 2 and all(not view.layout.is_video for view in frames)  # one call per temporal group
    assert all(sel.indices.numel() == 3 for view, sel in seen if view.num_tokens == 6)
    assert torch.isfinite(logits).all()


def test_per_frame_matches_hand_shortened_input():
    """per_frame=True on one video: logits == the stock language model on the union of the frames' own choices,
    at full-sequence positions (negative control: the whole-video choice is not balanced over the frames)."""
    tv = model("qwen2_vl")
    inputs = video_inputs(tv, [0])  # one video: 2 groups of 2x3 tokens
    with vtprune.apply(tv.model, "random", keep=0.5, per_frame=True) as handle:
        seen = _record(handle)
        hooked = tv.model(**inputs).logits
    assert [view.num_tokens for view, _ in seen] == [6, 6]
    (pos,) = _items(tv, inputs)
    keep_mask = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep_mask[pos] = False
    keep_mask[pos[torch.cat([sel.indices + 6 * f for f, (_, sel) in enumerate(seen)])]] = True
    keep = keep_mask.nonzero().flatten()
    lm_kw = _capture_lm(tv, inputs)
    reference = tv.model.lm_head(tv.model.model.language_model(
        inputs_embeds=lm_kw["inputs_embeds"][:, keep], position_ids=lm_kw["position_ids"][..., keep],
        attention_mask=torch.ones(1, keep.numel(), dtype=torch.long)).last_hidden_state)
    torch.testing.assert_close(hooked, reference, atol=1e-6, rtol=1e-6)
    with vtprune.apply(tv.model, "random", keep=0.5) as handle:
        seen = _record(handle)
        tv.model(**inputs)
    assert int((seen[0][1].indices < 6).sum()) != 3


@pytest.mark.parametrize("site", SITES, ids=[s["site"] for s in SITES])
def test_per_frame_cached_equals_uncached(site):
    tv = model("qwen2_5_vl")
    inputs = video_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "pool", keep=0.4, per_frame=True, **site):
        seq_c, step_c = _generate(tv, inputs)
        seq_u, step_u = _generate(tv, inputs, use_cache=False)
    assert torch.equal(seq_c, seq_u)
    torch.testing.assert_close(step_c, step_u, atol=1e-5, rtol=1e-5)


def test_per_frame_refuses_hints():
    tv = model("qwen2_vl")
    with vtprune.apply(tv.model, "informed", keep=0.5, per_frame=True) as handle:
        handle.set_hints([{"token_priority": {"question": [[0] * 12]}}])
        with pytest.raises(VTPruneError, match="informed.*per_frame=False"):
            tv.model(**video_inputs(tv, [0]))


def test_per_frame_keeps_tokens_outside_frames():
    """LLaVA-OneVision: the trailing newline (outside every frame) is kept and counts toward the budget; the rest
    is shared over the 4 pooled frames."""
    tv = model("llava_onevision")
    inputs = video_inputs(tv, [0])  # one video: 4 frames of 2x2 pooled tokens + a newline = 17
    with vtprune.apply(tv.model, "random", keep=0.5, per_frame=True) as handle:
        seen = _record(handle)
        tv.model(**inputs)
        assert handle.stats.samples[0].images == [(17, 9)]
    assert [view.num_tokens for view, _ in seen] == [4, 4, 4, 4]
    assert [sel.indices.numel() for _, sel in seen] == [2, 2, 2, 2]
    with vtprune.apply(tv.model, "random", keep=2, per_frame=True) as handle:
        seen = _record(handle)
        tv.model(**inputs)
        assert handle.stats.samples[0].images == [(17, 2)]
    assert [view.num_tokens for view, _ in seen] == [4]  # 1 token left after the newline: the first frame's


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [1.0, 0.4])
def test_flops_of_a_video_prompt_match_the_flop_counter(family, keep):
    """The exact count (vision encoder on every frame, projector, LLM on the kept tokens) equals FlopCounterMode on a
    forward with an image and a video, unpruned and pruned."""
    tv = model(family)
    inputs = video_inputs(tv, [1])
    with vtprune.apply(tv.model, "random", keep=keep) as handle:
        measured = F.measured_flops(lambda: tv.model(**inputs))
        report = F.flops_from_stats(tv.model, handle.stats, inputs=inputs, logits_to_keep=0)
    assert report.prefill_total == measured
    if keep == 1.0:
        assert F.flops_unpruned(tv.model, inputs, logits_to_keep=0).prefill_total == measured


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_synthetic_video(family):
    """``synthetic_inputs(..., video_frames=4)``: one video instead of the image, pruned like a processor's video,
    and counted exactly."""
    tv = model(family)
    size = (56, 84) if family in ("qwen2_vl", "qwen2_5_vl") else (64, 96)
    inputs = B.synthetic_inputs(tv.model.config, image_size=size, video_frames=4)
    assert "pixel_values" not in inputs and "pixel_values_videos" in inputs
    with vtprune.apply(tv.model, "random", keep=0.25) as handle:
        measured = F.measured_flops(lambda: tv.model(**inputs))
        report = F.flops_from_stats(tv.model, handle.stats, inputs=inputs, logits_to_keep=0)
        (images,) = [s.images for s in handle.stats.samples]
    assert images == ([(17, 4)] if family == "llava_onevision" else [(12, 3)])
    assert report.prefill_total == measured


def test_real_size_video_config():
    """Qwen2.5-VL-7B with a 32-frame 448x448 video: 16 temporal groups of 16x16 tokens; FLOPs from the config alone,
    the vision encoder counted per frame group."""
    cfg = B.load_config(B.resolve_model("qwen2.5-vl-7b"))
    inputs = B.synthetic_inputs(cfg, video_frames=32)
    assert int((inputs["input_ids"] == cfg.video_token_id).sum()) == 16 * 16 * 16
    assert inputs["video_grid_thw"].tolist() == [[16, 32, 32]] and inputs["second_per_grid_ts"].tolist() == [1.0]
    full = F.flops_unpruned(cfg, inputs)
    assert full.prefill["vision"] > 0
    with pytest.raises(VTPruneError, match="3 frames.*groups of 2"):
        B.synthetic_inputs(cfg, video_frames=3)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_signals_one_view_per_temporal_group(family):
    """The ViT attends within each temporal group, so a video's vision q/k come as one encoder view per group, whose
    patches feed that group's tokens only (a prompt of two videos: each reads its own pass slice)."""
    tv = model(family)
    with vtprune.apply(tv.model, "visionzip", keep=0.5) as handle:
        seen = _record(handle)
        tv.model(**video_inputs(tv, [3]))
    assert len(seen) == 2
    for view, _ in seen:
        frames = view.layout.frame_index()
        for views in view.extras["vision_qk"].values():
            assert len(views) == 2
            for group, v in enumerate(views):
                fed = v.token_of_patch[v.token_of_patch >= 0]
                assert v.query.shape[1] == v.token_of_patch.numel() == 4 * 4
                assert set(frames[fed].tolist()) == {group} and fed.unique().numel() == 4


@pytest.mark.parametrize("family,site", [c for c in CASES if c[0] in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")])
def test_video_in_a_later_turn(family, site):
    """A later turn brings a video into a pruned cache (a forward of the new tokens with the whole conversation's
    M-RoPE positions, as for a later image): pruned with its own budget, == the whole conversation in one pass."""
    tv = model(family)
    first = video_inputs(tv, [2])  # an image
    step = {"do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    content = [{"type": "video"}, {"type": "text", "text": "and what colour is it"}]
    turn = tv.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    new = dict(tv.processor(text=[turn], videos=[_video(7, (56, 84))], return_tensors="pt"))
    video_keys = [k for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in new]
    with vtprune.apply(tv.model, "random", keep=0.4, **site) as handle:
        out = tv.model.generate(**first, max_new_tokens=3, **step)
        ids = torch.cat([out.sequences, new["input_ids"]], 1)
        generated = out.sequences.shape[1] - first["input_ids"].shape[1]
        types = torch.cat([first["mm_token_type_ids"], torch.zeros(1, generated, dtype=torch.long),
                           new["mm_token_type_ids"]], 1)
        whole = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types,
                 "pixel_values": first["pixel_values"], "image_grid_thw": first["image_grid_thw"],
                 **{k: new[k] for k in video_keys}}
        one_pass = tv.model(**whole).logits[:, -1]
        pos, _ = tv.model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=first["image_grid_thw"], video_grid_thw=new["video_grid_thw"],
            attention_mask=whole["attention_mask"],
            **({"second_per_grid_ts": new["second_per_grid_ts"]} if "second_per_grid_ts" in new else {}))
        n_new = ids.shape[1] - out.sequences.shape[1] + 1

        def later(**kw) -> torch.Tensor:
            return tv.model(input_ids=ids[:, -n_new:], attention_mask=whole["attention_mask"],
                            past_key_values=copy.deepcopy(out.past_key_values), mm_token_type_ids=types[:, -n_new:],
                            **{k: new[k] for k in video_keys}, **kw).logits[:, -1]

        got = later(position_ids=pos[..., -n_new:])
        assert handle.stats.samples[0].images == [(12, 5)]  # the later video alone, with its own budget
        shifted = later(position_ids=pos[..., -n_new:] + 1)  # negative control: positions off by one
        with pytest.raises(VTPruneError, match="position_ids"):
            later()
    torch.testing.assert_close(got, one_pass, atol=1e-5, rtol=1e-5)
    assert (shifted - one_pass).abs().max() > 1e-4


@pytest.mark.parametrize("site", SITES, ids=[s["site"] for s in SITES])
def test_merge_proportional_on_video(site):
    """merge="proportional": dropped video tokens merge into kept ones of the same video, with per_frame too; cached
    == uncached."""
    tv = model("qwen2_vl")
    inputs = video_inputs(tv, [1])
    for per_frame in (False, True):
        with vtprune.apply(tv.model, "random", keep=0.4, merge="proportional", per_frame=per_frame, **site):
            seq_c, step_c = _generate(tv, inputs)
            seq_u, step_u = _generate(tv, inputs, use_cache=False)
        with vtprune.apply(tv.model, "random", keep=0.4, per_frame=per_frame, **site):
            _, dropped = _generate(tv, inputs)
        assert torch.equal(seq_c, seq_u)
        torch.testing.assert_close(step_c, step_u, atol=1e-5, rtol=1e-5)
        assert (step_c - dropped).abs().max() > 1e-4  # negative control: merging changed the outcome


def test_later_cuts_of_a_schedule_still_see_frames(monkeypatch):
    """A schedule's second cut gets the survivors one row per frame, so per_frame keeps splitting the budget over
    frames there (with a one-row layout it would see the whole video as one image: the negative control)."""
    from vtprune.methods.random import RandomPruner

    seen: list = []
    select = RandomPruner.select
    monkeypatch.setattr(RandomPruner, "select", lambda self, view, k: seen.append((view.num_tokens, k,
                        view.layout.is_video)) or select(self, view, k))
    tv = model("qwen2_5_vl")
    inputs = video_inputs(tv, [1])
    with vtprune.apply(tv.model, "random", schedule=[(1, 0.5), (2, 0.25)], site="layer", per_frame=True):
        tv.model(**inputs)
    # first cut: the image 8 -> 4, the video's two temporal groups 6 -> 3 each; second cut (keep 0.25 of the
    # original): the image 4 -> 2, the video's 3 = 2 + 1 over its groups' 3 survivors each
    assert seen == [(8, 4, False), (6, 3, False), (6, 3, False), (4, 2, False), (3, 2, False), (3, 1, False)]
