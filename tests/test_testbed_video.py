"""The video testbed (vtprune.testbed.video, eval/testbed/train_video.py): the generator's determinism and stored
hashes, answers that need time (reversing or cutting the frames changes them), balance, informed targets, the
training rows (isolated turns equal single-turn prompts), and a smoke run of the whole pipeline."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from eval.testbed.evaluate import TEST_SUBSET, default_checkpoint, evaluate, model_inputs
from eval.testbed.train import Recipe, Stage, stage2_inputs, torch_settings
from eval.testbed.train_video import VIDEO_DENSE_TARGETS, init_model, train_video
from eval.testbed.training_data import EVENT_CLASSES, video_patch_labels, video_stage1_batch, video_stage2_batch
from vtprune.testbed.dataset import IntegrityError
from vtprune.testbed.model import QWEN_VIDEO, load_checkpoint
from vtprune.testbed.video import (DIRECTIONS, EVENT_FRAMES, N_FRAMES, VIDEO_ANSWER_WORDS, VIDEO_ANSWERS,
                                   VIDEO_CATEGORIES, VIDEO_HELDOUT_FILE, VIDEO_HELDOUT_N, VIDEO_HELDOUT_SEED,
                                   VIDEO_WORDS, load_video_set, make_video_eval_set, render, save_video_set,
                                   video_questions_for, video_token_priorities, video_train_item)

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@pytest.fixture(scope="module")
def items():
    return make_video_eval_set(0, 120)


def _asked(item, video):
    """The answers ``video`` gives to ``item``'s question text (empty when the question is no longer valid)."""
    return [q.answer for q in video_questions_for(video, item.question.category) if q.text == item.question.text]


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    save_video_set(tmp_path / "a.json", make_video_eval_set(3, 12))
    save_video_set(tmp_path / "b.json", make_video_eval_set(3, 12))
    save_video_set(tmp_path / "c.json", make_video_eval_set(4, 12))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "c.json").read_bytes()
    assert make_video_eval_set(3, 5) == make_video_eval_set(3, 12)[:5]  # item i depends on (seed, i) only
    assert video_train_item(3, 7) == video_train_item(3, 7)
    assert {it.video for it in make_video_eval_set(3, 12)}.isdisjoint({video_train_item(3, k).video for k in range(12)})


def test_shipped_heldout_set_matches_its_seed_and_hashes():
    """The stored set is make_video_eval_set(777, 1200) and its frames render to the stored SHA-256."""
    loaded = load_video_set(VIDEO_HELDOUT_FILE, limit=12)  # verifies questions and hashes
    assert loaded == make_video_eval_set(VIDEO_HELDOUT_SEED, 12)
    doc = json.loads(gzip.decompress(VIDEO_HELDOUT_FILE.read_bytes()))
    assert len(doc["items"]) == VIDEO_HELDOUT_N


@pytest.mark.parametrize("edit", ["track", "answer", "pixels"])
def test_tampered_set_is_refused(tmp_path, edit):
    """Negative controls: a moved track, a wrong answer or a changed colour each raise IntegrityError."""
    save_video_set(tmp_path / "s.json", make_video_eval_set(1, 6))
    doc = json.loads((tmp_path / "s.json").read_text())
    entry = doc["items"][0]
    if edit == "track":
        moving = next(t for t in entry["video"]["tracks"] if t["dx"] or t["dy"])
        moving["dx"], moving["dy"] = -moving["dx"], -moving["dy"]
    elif edit == "answer":
        entry["answer"] = next(a for a in VIDEO_ANSWERS[entry["category"]] if a != entry["answer"])
    else:
        obj = entry["video"]["scene"]["objects"][0]
        obj["rgb"] = [min(255, c + 1) for c in obj["rgb"]]
    (tmp_path / "s.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match=entry["id"]):
        load_video_set(tmp_path / "s.json")


def test_fast_frames_equal_the_image_renderer(items):
    for it in items[:6]:
        for k, frame in enumerate(it.video.frames(112)):
            assert np.array_equal(np.asarray(frame), np.asarray(render(it.video.frame_scene(k), 112)))


# ------------------------------------------------------------------------------------ answers need time


def test_direction_flips_when_the_frames_are_reversed(items):
    checked = 0
    for it in items:
        if it.question.category == "direction":
            back = it.video.reversed()
            assert _asked(it, back) == [OPPOSITE[it.question.answer]]
            frames = [np.asarray(f) for f in back.frames(112)]
            assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(frames, reversed(it.video.frames(112))))
            checked += 1
    assert checked == 20


def test_reversal_turns_appearing_into_disappearing(items):
    for it in items:
        if it.question.category in ("appearing", "disappearing"):
            same = video_questions_for(it.video.reversed(), it.question.category)
            assert all(q.targets != it.question.targets for q in same)  # the object now does the opposite
            other = "disappears" if it.question.category == "appearing" else "appears"
            flipped = it.question.text.replace(it.question.text.split()[-2], other)
            back = video_questions_for(it.video.reversed(), "disappearing" if other == "disappears" else "appearing")
            assert [q.answer for q in back if q.text == flipped] == [it.question.answer]


def test_disappearance_is_lost_when_the_last_frames_are_dropped(items):
    cut = 0
    for it in items:
        if it.question.category == "disappearing":
            stop = it.video.tracks[it.question.targets[0]].stop
            assert stop in EVENT_FRAMES  # inside a 2-frame temporal patch
            assert _asked(it, it.video.truncated(stop + 1)) == [it.question.answer]  # control: event still shown
            assert _asked(it, it.video.truncated(stop)) != [it.question.answer]
            cut += 1
    assert cut == 20


def test_retrieval_answer_depends_on_the_asked_end(items):
    for it in items:
        if it.question.category == "retrieval":
            when = "start" if it.question.text.endswith("start ?") else "end"
            other = it.question.text.replace(when, {"start": "end", "end": "start"}[when])
            answers = [q.answer for q in video_questions_for(it.video, "retrieval") if q.text == other]
            assert answers and answers[0] != it.question.answer
            assert it.question.frames == ((0,) if when == "start" else (N_FRAMES - 1,))


def test_counting_counts_movers_over_frames(items):
    for it in items:
        if it.question.category == "counting":
            movers = [i for i, t in enumerate(it.video.tracks) if t.moves]
            assert VIDEO_ANSWERS["counting"][len(movers)] == it.question.answer
            assert all(it.video.tracks[i].first == 0 and it.video.tracks[i].stop == N_FRAMES for i in movers)


# -------------------------------------------------------------------------------- balance and vocabulary


def test_categories_take_turns_and_answers_are_balanced():
    items = make_video_eval_set(0, 6 * 28)  # 28 per category: full cycles of 4 and 7 answers
    by_cat = Counter(it.question.category for it in items)
    assert set(by_cat.values()) == {28}
    for c in VIDEO_CATEGORIES:
        counts = Counter(it.question.answer for it in items if it.question.category == c)
        assert set(counts) <= set(VIDEO_ANSWERS[c])
        assert max(counts.values()) - min(counts.values()) <= 1, (c, counts)


def test_every_word_is_in_the_video_vocabulary(items):
    from vtprune.testbed.model import build_tokenizer
    tok = build_tokenizer("qwen2_vl", VIDEO_WORDS)
    words = {w for it in items for w in it.question.text.split()} | set(VIDEO_ANSWER_WORDS)
    assert tok.unk_token_id not in tok.convert_tokens_to_ids(sorted(words))


# ------------------------------------------------------------------------------------------ targets


def test_token_priorities_mark_targets_in_their_frames(items):
    for it in items[:24]:
        prio = video_token_priorities(it)
        q, obj = np.array(prio["question"]).reshape(4, 64), np.array(prio["objects"]).reshape(4, 64)
        assert ((q > 0) == (obj > 0)).all()
        groups = {f // 2 for f in it.question.frames}
        hit = {g for g in range(4) if (q[g] == 2).any()}
        if it.question.targets:
            assert hit == groups, (it.question, hit, groups)
        else:
            assert not hit  # "how many objects move ? zero"


def test_stage1_labels_flag_motion_and_events_in_their_group(items):
    for it in items:
        labels = video_patch_labels(it.video, 224)
        motion = [set(g[6][g[6] > 0].tolist()) for g in labels]
        events = [set(g[7][g[7] > 0].tolist()) for g in labels]
        for i, t in enumerate(it.video.tracks):
            if t.moves:
                assert all(1 + list(DIRECTIONS).index(t.direction) in m for m in motion)
            elif t.first or t.stop < N_FRAMES:
                kind = EVENT_CLASSES.index("appears" if t.first else "disappears")
                group = (t.first or t.stop) // 2
                assert kind in events[group], (it.id, i)


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def tiny():
    with torch_settings(1):
        yield init_model(0, None, "tiny")


def test_video_batches_have_the_video_layout(tiny):
    _, processor = tiny
    s1 = video_stage1_batch(processor, 0, 0, 2)
    assert s1.inputs["video_grid_thw"].tolist() == [[4, 16, 16]] * 2
    assert s1.dense.motion.shape == s1.dense.colour.shape == (2, 4 * 256)
    batch = video_stage2_batch(processor, 0, 0, 2)
    assert ((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(QWEN_VIDEO)).sum(1) == 256).all()
    labelled = batch["labels"][batch["labels"] >= 0]
    answers = set(processor.tokenizer.convert_tokens_to_ids(list(VIDEO_ANSWER_WORDS) + ["<eos>"]))
    assert set(labelled.tolist()) <= answers


def test_isolated_turns_equal_single_question_prompts(tiny):
    """Each training turn's answer logits equal those of its one-question evaluation prompt (M-RoPE ids with a
    temporal axis included); a row without the isolation does not (negative control)."""
    model, processor = tiny
    model.eval()
    batch = video_stage2_batch(processor, 0, 1, 1)
    item = video_train_item(0, 1)
    with torch.no_grad():
        inputs = stage2_inputs(model, "qwen2_vl", dict(batch))
        labels = inputs.pop("labels")
        logits = model(**inputs).logits[0]
        plain = model(**{k: v for k, v in batch.items() if k not in ("labels", "segments")}).logits[0]
    ids = batch["input_ids"][0]
    eos = processor.tokenizer.eos_token_id
    answer_at = [p - 1 for p in range(1, len(ids)) if labels[0, p] >= 0 and ids[p] != eos]
    texts = [t.strip() for t in " ".join(processor.tokenizer.convert_ids_to_tokens(ids.tolist())).split("<eos>")]
    assert len(answer_at) >= 2
    differs = 0
    for turn, pos in enumerate(answer_at):
        text = texts[turn].split("<|vision_end|> ")[-1].rsplit(" ", 1)[0]
        single = replace(item, question=replace(item.question, text=text))
        with torch.no_grad():
            ref = model(**model_inputs(processor, "qwen2_vl", [single])).logits[0, -1]
        torch.testing.assert_close(logits[pos], ref, rtol=1e-4, atol=1e-4)
        differs += not torch.allclose(plain[pos], ref, rtol=1e-4, atol=1e-4)
    assert differs >= 1


def test_smoke_pipeline_from_the_image_checkpoint(tmp_path):
    """Generate, train a few steps from the shipped image checkpoint, save (<= 20 MB), reload and evaluate."""
    from eval.testbed.evaluate import default_checkpoint
    recipe = Recipe(Stage(steps=3, batch=2, lr=1.5e-3, warmup=1, dense_targets=VIDEO_DENSE_TARGETS),
                    Stage(steps=4, batch=2, lr=1e-3, warmup=1))
    log = train_video(0, tmp_path, default_checkpoint("qwen2_vl"), threads=1, eval_n=6, val_n=6, recipe=recipe)
    assert log["files"]["safetensors_bytes"] <= 20 * 2**20
    assert log["eval"]["heldout"]["n"] == 6 and 0 <= log["eval"]["heldout"]["accuracy"] <= 1
    model, processor = load_checkpoint(tmp_path)
    assert processor.tokenizer.convert_tokens_to_ids("disappears") != processor.tokenizer.unk_token_id
    result = evaluate(model, processor, make_video_eval_set(VIDEO_HELDOUT_SEED, 6), family="qwen2_vl")
    assert result.summary()["accuracy"] == log["eval"]["heldout"]["accuracy"]


def test_video_stage1_losses_read_only_their_patches():
    """Motion is scored on movers' patches and event on object patches; a batch without movers adds 0, not NaN
    (negative control: plain cross-entropy over no patches is NaN)."""
    from eval.testbed.train import _patch_loss
    logits, target = torch.randn(2, 5, 3), torch.tensor([[0, 1, 2, 0, 0], [0, 0, 1, 0, 0]])
    where = target > 0
    torch.testing.assert_close(_patch_loss(logits, target, where),
                               torch.nn.functional.cross_entropy(logits[where], target[where]))
    assert _patch_loss(logits, target, target > 5).item() == 0.0
    assert torch.isnan(torch.nn.functional.cross_entropy(logits[target > 5], target[target > 5]))


# ---------------------------------------------------------------------------------- shipped checkpoint

VIDEO_MIN_ACCURACY = 0.90  # issue 18: held-out unpruned accuracy of the video testbed
VIDEO_MAX_BYTES = 20 * 2**20


def _shipped_video_log():
    """The shipped video checkpoint's folder and training log (skips the test until it has been trained)."""
    path = default_checkpoint("qwen2_vl", video=True)
    if not (path / "train_log.json").exists():
        pytest.skip(f"no shipped video checkpoint at {path}: train it with `python -m eval.testbed.train_video`")
    return path, json.loads((path / "train_log.json").read_text())


def test_shipped_video_checkpoint_reaches_its_recorded_accuracy():
    """Re-score the first TEST_SUBSET held-out videos: the shipped weights give the accuracy the log records."""
    path, log = _shipped_video_log()
    assert sum(f.stat().st_size for f in path.iterdir()) <= VIDEO_MAX_BYTES
    model, processor = load_checkpoint(path)
    result = evaluate(model, processor, make_video_eval_set(VIDEO_HELDOUT_SEED, TEST_SUBSET), batch_size=20)
    # another machine or thread count may flip an answer or two of the 200
    assert abs(result.accuracy - log["eval"]["test_subset"]["accuracy"]) <= 0.015
    assert log["eval"]["test_subset"]["n"] == TEST_SUBSET


def test_shipped_video_checkpoint_meets_the_accuracy_bar():
    """The held-out score of the whole set (1,200 questions, 200 per category) clears the issue's bar."""
    _, log = _shipped_video_log()
    assert log["eval"]["heldout"]["n"] == VIDEO_HELDOUT_N
    assert log["eval"]["heldout"]["accuracy"] >= VIDEO_MIN_ACCURACY


@pytest.mark.parametrize("source", ["built", "qwen2_vl_video", "qwen2_vl"])
def test_the_per_video_pixel_cap_is_pinned_off_and_changes_nothing(source):
    """transformers warns that its Qwen video processors will start capping a video's pixels; the testbed's frames
    are fixed at 224², so the cap changes nothing, and the testbed pins it off (built and shipped processors) so a
    default flip cannot change the inputs. Capped and uncapped inputs are compared for one video."""
    from transformers import AutoProcessor

    from vtprune.testbed.model import build_processor

    processor = (build_processor("qwen2_vl") if source == "built"
                 else AutoProcessor.from_pretrained(default_checkpoint("qwen2_vl", video=source.endswith("video"))))
    assert processor.video_processor.cap_pixels_per_frame is False
    video = (np.random.default_rng(0).random((N_FRAMES, 224, 224, 3)) * 255).astype(np.uint8)
    plain = processor.video_processor([video], return_tensors="pt")
    capped = processor.video_processor([video], return_tensors="pt", cap_pixels_per_frame=True)
    assert torch.equal(plain["pixel_values_videos"], capped["pixel_values_videos"])
    assert plain["video_grid_thw"].tolist() == [[N_FRAMES // 2, 16, 16]]
