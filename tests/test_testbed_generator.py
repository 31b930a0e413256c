"""The synthetic VQA generator (vtprune.testbed): determinism, stored-set integrity, vocabulary, balance, targets
and geometry. No model involved; runs in a few seconds on CPU."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from vtprune.testbed.dataset import (IntegrityError, load_set, majority_baseline, make_eval_set, make_train_stream,
                                     pixel_hash, save_set, target_boxes, target_token_indices, train_item)
from vtprune.testbed.questions import ANSWERS, CATEGORIES, NUMBERS, VOCAB, YES_NO, questions_for
from vtprune.testbed.scenes import REF_SIZE, coverage, render, render_mask

COVERAGE_BOUND = 0.08  # mean share of pixels covered by objects (measured 0.064 on seed 0)
TOKEN_COVERAGE_BOUND = 0.20  # mean share of 12x12 tokens touching an object at 168 px (measured 0.16; study 0.32)


@pytest.fixture(scope="module")
def items():
    return make_eval_set(0, 500)


def test_same_seed_same_json_and_pixels(tmp_path):
    a, b = make_eval_set(5, 30), make_eval_set(5, 30)
    save_set(tmp_path / "a.json", a)
    save_set(tmp_path / "b.json", b)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    for x, y in zip(a[:5], b[:5]):
        assert np.array_equal(np.asarray(render(x.scene, 168)), np.asarray(render(y.scene, 168)))


def test_different_seed_differs(tmp_path):
    a, b = make_eval_set(5, 30), make_eval_set(6, 30)
    assert all(x.scene != y.scene for x, y in zip(a, b))
    assert all(pixel_hash(render(x.scene, 168)) != pixel_hash(render(y.scene, 168)) for x, y in zip(a, b))


def test_eval_set_is_prefix_stable():
    assert make_eval_set(5, 10) == make_eval_set(5, 30)[:10]


def test_train_stream_is_seeded_and_separate_from_eval():
    stream = make_train_stream(5)
    first = [next(stream) for _ in range(10)]
    assert [it.scene for it in first] == [train_item(5, s).scene for s in range(10)]
    assert next(make_train_stream(5, start=3)).scene == first[3].scene
    eval_scenes = {it.scene for it in make_eval_set(5, 30)}
    assert not eval_scenes & {it.scene for it in first}


def test_round_trip_renders_and_verifies(tmp_path):
    items = make_eval_set(2, 20)
    save_set(tmp_path / "set.json.gz", items)
    for size in (168, 224, 112):  # 112 has no stored hash: verified at 168, then rendered at 112
        loaded = load_set(tmp_path / "set.json.gz", size)
        assert [it for it, _ in loaded] == items
        assert all(img.size == (size, size) for _, img in loaded)
    assert pixel_hash(loaded[0][1]) == pixel_hash(render(items[0].scene, 112))


def _tamper(tmp_path, edit) -> str:
    """Save a small set, apply ``edit`` to item 3's JSON entry, and return the load error message."""
    path = tmp_path / "set.json"
    save_set(path, make_eval_set(2, 6))
    doc = json.loads(path.read_text())
    edit(doc["items"][3])
    path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError) as err:
        load_set(path, 168)
    return str(err.value)


def test_tampered_spec_fails_loudly(tmp_path):
    def nudge_colour(entry):
        entry["scene"]["objects"][0]["rgb"][1] += 1
    msg = _tamper(tmp_path, nudge_colour)
    assert "eval-2-3" in msg and "SHA-256" in msg


def test_tampered_background_fails_loudly(tmp_path):
    def reseed(entry):
        entry["scene"]["background"]["noise_seed"] += 1
    assert "eval-2-3" in _tamper(tmp_path, reseed)


def test_tampered_answer_fails_loudly(tmp_path):
    def flip(entry):
        entry["answer"] = next(a for a in ANSWERS[entry["category"]] if a != entry["answer"])
    assert "eval-2-3" in _tamper(tmp_path, flip)


def test_answers_are_single_vocab_words(items):
    for it in items:
        q = it.question
        assert q.answer in VOCAB and len(q.answer.split()) == 1 and q.answer in ANSWERS[q.category]
        assert q.text.endswith(" ?") and all(w in VOCAB for w in q.text.split())


def test_every_category_present(items):
    assert set(Counter(it.question.category for it in items)) == set(CATEGORIES)


def test_answers_balanced(items):
    by_cat: dict[str, Counter] = {}
    for it in items:
        by_cat.setdefault(it.question.category, Counter())[it.question.answer] += 1
    for cat, counts in by_cat.items():
        n, k = sum(counts.values()), len(ANSWERS[cat])
        assert set(counts) == set(ANSWERS[cat]), cat
        assert max(counts.values()) <= -(-n // k), cat  # answers dealt in full cycles
    baseline = majority_baseline(items)
    for cat in CATEGORIES:
        if ANSWERS[cat] == YES_NO:
            assert baseline[cat] <= 0.6


def test_questions_hold_for_their_scenes(items):
    for it in items:
        q, objs = it.question, it.scene.objects
        assert q in questions_for(it.scene, q.category)
        t = [objs[i] for i in q.targets]
        if q.category == "colour":
            assert t[0].colour == q.answer
        elif q.category == "shape":
            assert t[0].shape == q.answer
        elif q.category == "position":
            assert t[0].quadrant == q.answer
        elif q.category == "counting":
            assert len(t) == NUMBERS.index(q.answer)
        elif q.category == "small_object":
            assert t[0].small and q.answer in (t[0].colour, t[0].shape)
        else:
            assert t, "existence questions always have targets (matches or near misses)"


def test_target_boxes_inside_image(items):
    for it in items:
        for size in (168, 224):
            for x0, y0, x1, y1 in target_boxes(it, size):
                assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size


def test_small_objects_inside_one_patch_at_168(items):
    for it in items[:200]:
        mask = render_mask(it.scene, 168)
        for i, obj in enumerate(it.scene.objects):
            ys, xs = np.nonzero(mask == i + 1)
            assert len(ys), "every object is drawn"
            if obj.small:
                assert len({(int(y) // 14, int(x) // 14) for y, x in zip(ys, xs)}) == 1


def test_objects_stay_inside_one_quadrant(items):
    for it in items[:200]:
        mask = render_mask(it.scene, 168)
        for i, obj in enumerate(it.scene.objects):
            ys, xs = np.nonzero(mask == i + 1)
            top, left = obj.quadrant.split("-")
            assert (ys < 84).all() == (top == "top") and (ys >= 84).all() == (top == "bottom")
            assert (xs < 84).all() == (left == "left") and (xs >= 84).all() == (left == "right")


def test_target_token_indices():
    items = make_eval_set(4, 70)
    for it in items:
        llava = target_token_indices(it, 168, 14)
        qwen = target_token_indices(it, 224, 14, merge=2)
        assert all(0 <= i < 144 for i in llava) and all(0 <= i < 64 for i in qwen)
        assert bool(llava) == bool(it.question.targets) == bool(qwen)
        if it.small_target and len(it.question.targets) == 1:
            assert len(llava) == 1
        cells = {(y // 14) * 12 + x // 14 for x0, y0, x1, y1 in target_boxes(it, 168)
                 for y in range(y0, y1) for x in range(x0, x1)}
        assert set(llava) <= cells
    with pytest.raises(ValueError):
        target_token_indices(items[0], 170, 14)


def test_object_coverage_below_bound(items):
    pixel = [coverage(it.scene) for it in items]
    tokens = [(render_mask(it.scene, REF_SIZE) > 0).reshape(12, 14, 12, 14).any(axis=(1, 3)).mean()
              for it in items]
    assert np.mean(pixel) < COVERAGE_BOUND
    assert np.mean(tokens) < TOKEN_COVERAGE_BOUND
