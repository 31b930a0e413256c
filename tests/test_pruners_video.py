"""Issue 18's temporal methods (dycoke, fastvid, evs) on hand-built video views: duplicated frames are the ones
dropped or merged, static patches are dropped by EVS, budgets are exact (reference modes: their papers' count rules,
checked against the numbers in ../shared/docs/methods-next.md §5), selections are deterministic, and each reference
mode matches a plain re-implementation of its reference code's loop written here. Images run the documented
one-instant fallbacks. End to end on tiny Qwen2-VL / Qwen2.5-VL video prompts (a video alone, an image then a video):
keep-all is bit-identical, every item keeps its count, cached == uncached, and a static video's merged frames equal
the first frame's tokens. Keep-all identity, exact budgets, cached == uncached and batch == single on images of every
family are in test_pruners_all.py and tests/bad_input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import GEN, model
from test_video import video_inputs

import vtprune
from vtprune import ops
from vtprune.errors import VTPruneError
from vtprune.methods.dycoke import LOST, reference_frames
from vtprune.methods.fastvid import (
    anchor_frames,
    dynamic_segments,
    frame_saliency,
    merge_into_anchors,
)
from vtprune.registry import build_pruner, make_config
from vtprune.view import ImageLayout, Segment, Selection, VisualView, budget

METHODS = ("dycoke", "fastvid", "evs")
ROWS, COLS, DIM = 3, 4, 8
TPF = ROWS * COLS


def _view(features: torch.Tensor, layout: ImageLayout) -> VisualView:
    return VisualView(features=features, text=torch.zeros(0, features.shape[1]), layout=layout, site="pre_llm",
                      layer=None, sample=0, image=0)


def _video(frames: torch.Tensor, newline: bool = False) -> VisualView:
    """A view of ``frames`` [T, TPF, D] on a ROWS x COLS grid per frame (+ LLaVA-OV's trailing newline token)."""
    layout = ImageLayout.video(Segment(ROWS, COLS), frames.shape[0])
    x = frames.reshape(-1, frames.shape[-1])
    if newline:
        layout = ImageLayout(layout.segments + (Segment(1, 0, newline=True),), layout.frames + (-1,))
        x = torch.cat([x, torch.full((1, x.shape[1]), 5.0)])
    return _view(x, layout)


def _random(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(frames, TPF, DIM, generator=torch.Generator().manual_seed(seed))


def _pruner(name: str, **options):
    """The method with ``options``; FastVID reads ATS from the features (hand-built views carry no encoder q/k)."""
    return build_pruner(make_config(name, **({"saliency": "features"} if name == "fastvid" else {}), **options))


def _run(name: str, view: VisualView, keep, **options) -> tuple[Selection, int]:
    pruner = _pruner(name, keep=keep, **options)
    k = min(pruner.count(view.layout), view.num_tokens)
    sel = pruner.select(view, k)
    sel.check(view.num_tokens, k)
    return sel, k


def _frame_positions(sel: Selection) -> set[tuple[int, int]]:
    return {(i // TPF, i % TPF) for i in sel.indices.tolist()}


# ---- shared properties -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("keep", [0.05, 0.11, 0.25, 0.5, 0.9, 1, 7, 95])
@pytest.mark.parametrize("newline", [False, True])
def test_clean_budgets_are_exact_per_video(name, keep, newline):
    view = _video(_random(8), newline)
    sel, k = _run(name, view, keep)
    assert k == budget(keep, view.num_tokens)
    assert sel.indices.numel() == k


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("mode", ["clean", "reference"])
def test_selections_are_deterministic(name, mode):
    view = _video(_random(6, seed=3))
    a, _ = _run(name, view, 0.3, mode=mode)
    b, _ = _run(name, _video(_random(6, seed=3)), 0.3, mode=mode)
    assert torch.equal(a.indices, b.indices)
    for x, y in ((a.embeddings, b.embeddings), (a.sizes, b.sizes)):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("name", METHODS)
def test_selecting_every_token_keeps_every_state(name):
    view = _video(_random(5), newline=True)
    sel = _pruner(name, keep=view.num_tokens).select(view, view.num_tokens)
    assert torch.equal(sel.indices, torch.arange(view.num_tokens))
    assert sel.embeddings is None or torch.equal(sel.embeddings, view.features)


@pytest.mark.parametrize("name", METHODS)
def test_the_trailing_newline_ranks_last_in_clean_mode(name):
    view = _video(_random(4), newline=True)
    last = view.num_tokens - 1
    assert last not in _run(name, view, 0.5)[0].indices.tolist()
    assert _run(name, view, last)[0].indices.tolist() == list(range(last))  # every grid token before it


@pytest.mark.parametrize("name", ["dycoke", "evs"])
def test_images_fall_back_to_an_even_lattice_or_keep_everything(name):
    """An image is one instant: no token has an earlier frame, so the clean mode spreads the budget evenly over the
    image's grid segments and the reference mode keeps the image whole (its count is V)."""
    layout = ImageLayout((Segment(4, 4), Segment(2, 3, newline=True)))
    view = _view(_random(1, seed=1).repeat(1, 3, 1).reshape(-1, DIM)[:layout.size], layout)
    sel, k = _run(name, view, 0.5)
    grids = [idx.flatten() for _, idx in layout.grid_tokens()]
    assert torch.equal(sel.indices, ops.spread(grids, k))
    assert build_pruner(make_config(name, keep=0.5, mode="reference")).count(layout) == layout.size


def test_fastvid_on_an_image_keeps_salient_tokens_and_merged_anchors():
    view = _view(_random(1, seed=2)[0], ImageLayout((Segment(ROWS, COLS),)))
    sel, k = _run("fastvid", view, 6)
    assert k == 6
    assert float(sel.sizes.sum()) == TPF  # every dropped token merged into exactly one anchor


# ---- ops ---------------------------------------------------------------------------------------------------
def test_frames_of_a_video_and_of_an_image():
    view = _video(_random(3), newline=True)
    frames = ops.frames_of(view.layout)
    assert frames.video and len(frames.grids) == 3
    assert [g.tolist() for g in frames.grids] == [list(range(t * TPF, (t + 1) * TPF)) for t in range(3)]
    assert frames.other.tolist() == [3 * TPF]
    assert frames.previous(0) is None and torch.equal(frames.previous(2), frames.grids[1])
    image = ops.frames_of(ImageLayout((Segment(2, 2), Segment(2, 2, newline=True))))
    assert not image.video and image.previous(1) is None  # an image's segments never precede each other
    assert image.other.tolist() == [6, 9]


def test_a_frame_of_another_shape_has_no_previous_frame():
    layout = ImageLayout((Segment(2, 2), Segment(2, 2), Segment(1, 4)), (0, 1, 2))
    frames = ops.frames_of(layout)
    assert frames.previous(1) is not None and frames.previous(2) is None


def test_paired_dissimilarity_and_spread():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
    assert ops.paired_dissimilarity(a, b).tolist() == [0.0, 1.0, 1.0]
    groups = [torch.arange(10), torch.arange(10, 15)]
    assert ops.spread(groups, 3).tolist() == [0, 9, 12]  # 2 of 10 and 1 of 5, each an even lattice
    assert ops.spread(groups, 15).tolist() == list(range(15))


def test_density_peak_scores_pick_one_token_per_blob():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(6, 2, generator=g) for c in centres])
    peaks = torch.topk(ops.density_peak_scores(x, 4, torch.Generator().manual_seed(1)), 3).indices
    assert sorted((peaks // 6).tolist()) == [0, 1, 2]
    # negative control: the plain density (no distance to a denser token) picks within one blob
    density = (-(torch.topk(torch.cdist(x, x) / math.sqrt(2), 4, largest=False).values ** 2).mean(-1)).exp()
    assert len(set((torch.topk(density, 3).indices // 6).tolist())) < 3


# ---- EVS ---------------------------------------------------------------------------------------------------
def _naive_evs(frames: torch.Tensor, count: int) -> list[int]:
    """vLLM's compute_retention_mask, written plainly: 255 for the first frame, 1 - cos to the previous frame for
    the others, a stable descending sort, the first ``count``."""
    score = [255.0] * TPF
    for t in range(1, frames.shape[0]):
        score += (1 - F.cosine_similarity(frames[t], frames[t - 1], dim=-1)).tolist()
    return sorted(sorted(range(len(score)), key=lambda i: -score[i])[:count])


def test_evs_drops_the_static_patches():
    frames = _random(1).repeat(4, 1, 1)
    moving = {(1, 5), (2, 6), (3, 0)}  # a patch changes in frame t and stays changed
    g = torch.Generator().manual_seed(10)
    for t, p in moving:
        frames[t:, p] = torch.randn(DIM, generator=g)
    sel, _ = _run("evs", _video(frames), TPF + len(moving))
    assert _frame_positions(sel) == {(0, p) for p in range(TPF)} | moving
    # a patch that changes and changes back is kept in both frames: EVS compares with the previous frame only
    frames[2, 9] = torch.randn(DIM, generator=g)
    sel, _ = _run("evs", _video(frames), TPF + len(moving) + 2)
    assert _frame_positions(sel) == {(0, p) for p in range(TPF)} | moving | {(2, 9), (3, 9)}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
def test_evs_reference_follows_vllm(seed, keep):
    frames = _random(6, seed)
    sel, k = _run("evs", _video(frames), keep, mode="reference")
    assert k == max(TPF, math.floor(6 * TPF * keep))
    assert sel.indices.tolist() == _naive_evs(frames, k)
    clean, _ = _run("evs", _video(frames), keep)
    assert clean.indices.tolist() == _naive_evs(frames, budget(keep, 6 * TPF))


@pytest.mark.parametrize("keep,count", [(0.1, TPF), (0.5, 3 * TPF), (5, TPF), (40, 40), (0.999, 6 * TPF - 1)])
def test_evs_reference_count_keeps_at_least_the_first_frame(keep, count):
    layout = ImageLayout.video(Segment(ROWS, COLS), 6)
    assert build_pruner(make_config("evs", keep=keep, mode="reference")).count(layout) == count


def test_evs_below_the_first_frame_keeps_a_lattice_of_it():
    sel, k = _run("evs", _video(_random(4)), 0.05)
    assert k == 2 and sel.indices.tolist() == ops.lattice(TPF, 2).indices.tolist()


# ---- DyCoke ------------------------------------------------------------------------------------------------
def _naive_dycoke(frames: torch.Tensor, keep: float) -> set[tuple[int, int]]:
    """The reference's dycole_ttm loops, written plainly: pairs (i, i+1) keep frame i and frame i+1's
    ⌊keep·n⌋ least similar tokens; windows i < F-4 (step 4) replace frame i+2 by its least similar to frame i; an
    odd last frame is lost."""
    n, num = frames.shape[1], frames.shape[0]
    m = int(keep * n)

    def least(t: int, r: int) -> set[tuple[int, int]]:
        sim = F.cosine_similarity(frames[t], frames[r], dim=-1).tolist()
        return {(t, p) for p in sorted(range(n), key=lambda p: sim[p])[:m]}

    kept: dict[int, set] = {}
    for i in range(0, num - 1, 2):
        kept[i] = {(i, p) for p in range(n)}
        kept[i + 1] = least(i + 1, i)
    for i in range(0, num - 4, 4):
        kept[i + 2] = least(i + 2, i)
    return set().union(*kept.values())


def test_dycoke_reference_frames():
    assert reference_frames(8, reference=False) == [None, 0, 0, 2, None, 4, 4, 6]
    assert reference_frames(8, reference=True) == [None, 0, 0, 2, None, 4, None, 6]
    assert reference_frames(5, reference=True) == [None, 0, 0, 2, LOST]
    assert reference_frames(4, reference=True) == [None, 0, None, 2]  # no window i < F - 4: no stage 2
    assert reference_frames(5, reference=False) == [None, 0, 0, 2, None]
    assert reference_frames(1, reference=True) == [LOST]


def test_dycoke_reference_count_is_the_papers_32_frame_number():
    """LLaVA-OV-7B, 32 frames x 196 tokens, K = 0.7: 9·196 + 23·58 = 3098 of 6272 (methods-next.md §5.1), and
    the trailing newline token stays."""
    layout = ImageLayout.video(Segment(14, 14), 32)
    assert build_pruner(make_config("dycoke", keep=0.3, mode="reference")).count(layout) == 3098
    with_newline = ImageLayout(layout.segments + (Segment(1, 0, newline=True),), layout.frames + (-1,))
    assert build_pruner(make_config("dycoke", keep=0.3, mode="reference")).count(with_newline) == 3099


@pytest.mark.parametrize("num", [4, 7, 8, 9])
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_dycoke_reference_follows_the_code(num, keep):
    frames = _random(num, seed=num)
    sel, _ = _run("dycoke", _video(frames), keep, mode="reference")
    assert _frame_positions(sel) == _naive_dycoke(frames, keep)
    assert sel.embeddings is None  # the code drops


def test_dycoke_merges_identical_frames_into_the_first():
    first = _random(1)
    sel, _ = _run("dycoke", _video(first.repeat(4, 1, 1)), 0.25)
    assert sel.indices.tolist() == list(range(TPF))
    assert sel.sizes.tolist() == [4.0] * TPF
    assert torch.equal(sel.embeddings, first[0])


def test_dycoke_keeps_the_changed_tokens_and_averages_the_repeated_ones():
    """Frames 1-3 repeat frame 0 (up to noise) except where a patch changes: (1, 2) in frame 1 only, (2, 7) from
    frame 2 on, (3, 11) in frame 3. Frame 2 is compared with frame 0, frame 3 with frame 2, so the kept tokens are
    frame 0 and the three changes; each dropped token is averaged into the kept token it repeats along its reference
    chain: (3, 7) into (2, 7), the rest into frame 0 (frame 3's through frame 2's)."""
    g = torch.Generator().manual_seed(4)
    frames = torch.randn(TPF, DIM, generator=g).repeat(4, 1, 1) + 0.01 * torch.randn(4, TPF, DIM, generator=g)
    frames[1, 2] = torch.randn(DIM, generator=g)
    frames[2:, 7] = torch.randn(DIM, generator=g)
    frames[3, 11] = torch.randn(DIM, generator=g)
    sel, _ = _run("dycoke", _video(frames), TPF + 3)
    assert _frame_positions(sel) == {(0, p) for p in range(TPF)} | {(1, 2), (2, 7), (3, 11)}
    group = {p: [0] + [t for t in (1, 2, 3) if (t, p) not in {(1, 2), (2, 7), (3, 7), (3, 11)}] for p in range(TPF)}
    expected = torch.stack([frames[group[p], p].mean(0) for p in range(TPF)]
                           + [frames[1, 2], frames[2:, 7].mean(0), frames[3, 11]])
    torch.testing.assert_close(sel.embeddings, expected)
    assert sel.sizes.tolist() == [float(len(group[p])) for p in range(TPF)] + [1.0, 2.0, 1.0]
    assert float(sel.sizes.sum()) == 4 * TPF
    # negative control: the reference mode keeps its per-frame count whatever the frames repeat
    ref, _ = _run("dycoke", _video(frames), 0.25, mode="reference")
    assert sum(1 for t, _ in _frame_positions(ref) if t == 1) == 3


def test_dycoke_below_the_anchors_keeps_a_lattice_of_each_anchor_frame():
    view = _video(_random(8))  # anchors: frames 0 and 4
    sel, _ = _run("dycoke", view, 6)
    assert sel.indices.tolist() == ops.spread([torch.arange(TPF), torch.arange(4 * TPF, 5 * TPF)], 6).tolist()
    assert sel.embeddings is None


# ---- FastVID -----------------------------------------------------------------------------------------------
def test_dynamic_segments_cut_at_the_lowest_transitions_and_below_tau():
    angles = torch.tensor([0.0, 0.1, 0.3, 1.3, 1.35, 1.4, 2.4, 2.41])  # jumps after frames 2 and 5, then 1 -> 2
    globals_ = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert dynamic_segments(globals_, 2, -1.0) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert dynamic_segments(globals_, 0, 0.9) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert dynamic_segments(globals_, 0, -1.0) == [list(range(8))]
    assert dynamic_segments(globals_, 3, -1.0) == [[0, 1], [2], [3, 4, 5], [6, 7]]
    assert dynamic_segments(globals_, 20, -1.0) == [[t] for t in range(8)]
    assert dynamic_segments(globals_[:1], 7, 0.9) == [[0]]


def test_anchor_frames_count_from_the_segment_end():
    assert anchor_frames(1, 4) == [0]
    assert anchor_frames(4, 4) == [3]
    assert anchor_frames(5, 4) == [0, 4]
    assert anchor_frames(8, 4) == [3, 7]
    assert anchor_frames(3, 1) == [0, 1, 2]


def test_merge_into_anchors_weights():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.9]])
    anchors, pool = torch.tensor([0, 1]), torch.tensor([2, 3, 4, 5])
    merged, sizes = merge_into_anchors(x, anchors, pool, beta=0.6)
    # anchor 0 takes 3 tokens: w = max(1/4, 0.6) = 0.6; anchor 1 takes 1: w = max(1/2, 0.6) = 0.6
    torch.testing.assert_close(merged[0], 0.6 * x[0] + 0.4 * x[2:5].mean(0))
    torch.testing.assert_close(merged[1], 0.6 * x[1] + 0.4 * x[5])
    assert sizes.tolist() == [4.0, 2.0]
    merged, _ = merge_into_anchors(x, anchors, pool, beta=0.0)
    torch.testing.assert_close(merged[0], 0.25 * x[0] + 0.75 * x[2:5].mean(0))  # w = 1/(n+1): the plain mean
    # an anchor in its own pool joins itself: counted for w (the reference's quirk), not in its size
    merged, sizes = merge_into_anchors(x, anchors, torch.tensor([0, 2]), beta=0.0)
    torch.testing.assert_close(merged[0], 1 / 3 * x[0] + 2 / 3 * x[[0, 2]].mean(0))
    assert sizes.tolist() == [2.0, 1.0] and torch.equal(merged[1], x[1])


def test_mean_query_attention_is_a_softmax_per_group():
    g = torch.Generator().manual_seed(8)
    query, key = torch.randn(2, 7, 4, generator=g), torch.randn(2, 7, 4, generator=g)
    graph = ops.AttentionGraph(query, key, 0.5, torch.arange(7), has_cls=False)
    group = torch.tensor([-1, 0, 0, 1, 1, 1, 0])
    scores = ops.mean_query_attention(graph, group)
    for f in (0, 1):
        nodes = (group == f).nonzero().flatten()
        q = query[:, nodes].mean(1)  # [H, d]
        by_hand = ((q[:, None] * key[:, nodes]).sum(-1) * 0.5).softmax(-1).mean(0)
        torch.testing.assert_close(scores[nodes], by_hand)
    assert scores[0] == 0


def test_feature_saliency_is_a_softmax_per_frame():
    view = _video(_random(3), newline=True)
    scores = frame_saliency(view, "features")
    for t in range(3):
        torch.testing.assert_close(scores[t * TPF:(t + 1) * TPF].sum(), torch.tensor(1.0))
    assert scores[-1] == 0  # the newline is in no frame


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_fastvid_clean_merges_every_dropped_token_once(keep):
    view = _video(_random(8, seed=5))
    sel, k = _run("fastvid", view, keep, segments=3)
    assert float(sel.sizes.sum()) == view.num_tokens
    assert sel.indices.numel() == k


def test_fastvid_counts_per_frame():
    layout = ImageLayout.video(Segment(14, 14), 32)
    pruner = build_pruner(make_config("fastvid", keep=0.1, mode="reference"))
    assert pruner.count(layout) == 32 * 19  # "32·19 of 6272" (methods-next.md §5.2)
    assert build_pruner(make_config("fastvid", keep=0.1)).count(layout) == 627


def test_fastvid_anchors_of_a_static_segment_stand_for_the_whole_segment():
    """Identical frames in one segment (no cuts): the segment's context budget goes to its anchor frame (the last),
    whose anchors absorb every other non-salient token of the segment — the repeats of earlier frames included."""
    frames = _random(1, seed=6).repeat(4, 1, 1)
    sel, _ = _run("fastvid", _video(frames), 0.5, segments=1, tau=-1.0, contextual=0.4)
    per_frame_salient = 6 - int(6 * 0.4)
    counts = [sum(1 for t, _ in _frame_positions(sel) if t == f) for f in range(4)]
    assert counts == [per_frame_salient] * 3 + [per_frame_salient + 4 * int(6 * 0.4)]
    assert float(sel.sizes.sum()) == 4 * TPF


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_fastvid_reference_pool_counts_tokens_once_per_anchor_frame(keep):
    view = _video(_random(8, seed=7))
    sel, k = _run("fastvid", view, keep, mode="reference", segments=1, tau=-1.0)
    assert k == 8 * int(TPF * keep)
    assert float(sel.sizes.sum()) > view.num_tokens  # two anchor frames (3, 7) each absorb the segment


@pytest.mark.parametrize("field,value", [("segments", 0), ("tau", 2.0), ("contextual", 1.0), ("anchor_every", 0),
                                         ("beta", -0.5)])
def test_fastvid_options_are_validated(field, value):
    with pytest.raises(VTPruneError, match=field):
        make_config("fastvid", **{field: value})


# ---- end to end on a tiny Qwen video ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("mode", ["clean", "reference"])
def test_end_to_end_on_a_tiny_qwen_video(family, name, mode):
    """Sample 0 is a video (2 temporal groups), sample 1 an image then a video: keep-all is bit-identical, each item
    keeps its count (clean: the budget; reference: the method's rule, the image whole for dycoke and evs), the
    methods see the video layout, and cached == uncached generation."""
    tv = model(family)
    inputs = video_inputs(tv, [0, 1])
    with torch.no_grad():
        ref = tv.model(**inputs).logits
    with vtprune.apply(tv.model, name, keep=1.0, mode=mode), torch.no_grad():
        assert torch.equal(tv.model(**inputs).logits, ref)
    with vtprune.apply(tv.model, name, keep=0.5, mode=mode) as handle:
        layouts = []
        count = handle.pruner.count
        handle.pruner.count = lambda layout: layouts.append(layout) or count(layout)
        seq_c = tv.model.generate(**inputs, **GEN).sequences
        items = [image for sample in handle.stats.samples for image in sample.images]
        assert [layout.is_video for layout in layouts] == [True, False, True]
        assert items == [(layout.size, min(count(layout), layout.size)) for layout in layouts]
        if mode == "clean":
            assert [after for _, after in items] == [budget(0.5, before) for before, _ in items]
        seq_u = tv.model.generate(**inputs, **GEN, use_cache=False).sequences
    assert torch.equal(seq_c, seq_u)


def test_fastvid_encoder_saliency_is_a_distribution_per_temporal_group():
    """On a Qwen2-VL video the captured encoder q/k give each temporal group's tokens the attention of that group's
    mean query: the scores of each group sum to 1 (a score spread over the whole video would not)."""
    tv = model("qwen2_vl")
    views = []
    with vtprune.apply(tv.model, "fastvid", keep=0.5) as handle, torch.no_grad():
        select = handle.pruner.select
        handle.pruner.select = lambda view, k: views.append(view) or select(view, k)
        tv.model(**video_inputs(tv, [0]))
    (view,) = views
    scores = frame_saliency(view, "encoder")
    sums = [float(scores[idx].sum()) for idx in view.layout.frame_tokens()]
    assert len(sums) == 2 and sums == pytest.approx([1.0, 1.0])


def _static_video_inputs(tv) -> dict:
    """One prompt with a video of 4 identical frames (2 identical temporal groups)."""
    frame = np.random.default_rng(7).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    content = [{"type": "video"}, {"type": "text", "text": "what moves"}]
    prompt = tv.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(tv.processor(text=[prompt], videos=[np.stack([frame] * 4)], return_tensors="pt"))


def test_a_static_video_keeps_its_first_frame():
    """Both temporal groups are identical: DyCoke merges the second into the first (the averages of identical
    states are those states), EVS keeps the first frame, so both give the same logits; a lattice over both groups
    (uniform) keeps other tokens and positions (negative control)."""
    tv = model("qwen2_vl")
    inputs = _static_video_inputs(tv)
    logits = {}
    for name in ("dycoke", "evs", "uniform"):
        with vtprune.apply(tv.model, name, keep=0.5) as handle, torch.no_grad():
            logits[name] = tv.model(**inputs).logits
            assert handle.stats.samples[0].images == [(12, 6)]
    assert torch.equal(logits["dycoke"], logits["evs"])
    assert not torch.allclose(logits["uniform"], logits["evs"])


@pytest.mark.parametrize("name", METHODS)
def test_temporal_methods_refuse_per_frame_selection_by_name(name):
    with pytest.raises(VTPruneError, match=rf"per_frame=True: {name!r} compares a video's frames"):
        make_config(name, per_frame=True)
    assert make_config(name, per_frame=False).per_frame is False
