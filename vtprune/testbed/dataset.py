"""Seeded evaluation sets and training streams for the synthetic VQA testbed, their JSON files, and the
mapping from a question's target objects to visual-token grid cells.

* ``make_eval_set(seed, n)`` is a pure function of its arguments: item i depends only on (seed, i), so a
  longer set extends a shorter one. Categories take turns (item i has category ``CATEGORIES[i % 6]``) and
  within a category the answers are dealt from shuffled full cycles, so every answer of a category occurs
  equally often (up to one incomplete cycle).
* ``train_item(seed, step)`` / ``make_train_stream(seed)`` draw from a different seed stream, with a uniform
  category and a uniform answer within it (balanced in expectation).
* ``save_set`` stores scene specs and Q/A, not pixels, plus the SHA-256 of the rendered pixels at each of
  ``HASH_SIZES``. ``load_set`` renders at the requested size and raises ``IntegrityError`` naming the item
  when a hash or a question no longer matches its scene (numpy or Pillow drift, or an edited file).

Majority-class baseline (share of the most frequent answer per category, ``majority_baseline``) of
``make_eval_set(0, 1200)``; a model at these numbers has learned nothing from the image:

    colour 14.5 %, shape 25.0 %, existence 50.0 %, position 25.0 %, counting 17.0 %, small_object 9.5 %.

These are the balanced rates 1/7, 1/4, 1/2, 1/4, 1/6, 1/11 plus the remainder of an incomplete
cycle. (small_object mixes colour and shape answers, so knowing the template gives 1/7 or 1/4.)

Reporting note (docs/testbed.md, pitfall 3): a tiny VLM counts through the share of matching tokens, so
``counting`` accuracy measures the change in the number of tokens as much as lost information; report it
separately. Object sizes are mixed within every count so that area alone does not give the count away.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .questions import ANSWERS, CATEGORIES, Question, questions_for, sample_question
from .scenes import Scene, pick, pixel_box, render, render_mask

FORMAT = "vtprune-testbed-1"
HASH_SIZES: tuple[int, ...] = (168, 224)  # LLaVA 168/14 -> 12x12 tokens; Qwen2-VL 224/14, merge 2 -> 8x8
EVAL_STREAM, TRAIN_STREAM = 1, 2  # seed streams: eval and training items never share a generator
ANSWER_DEAL, SCENE_DRAW = 0, 1  # sub-streams of the eval stream


class IntegrityError(ValueError):
    """A stored item no longer renders to its pixel hash, or its question no longer fits its scene."""


@dataclass(frozen=True)
class Item:
    """One evaluation or training example: a scene spec and one question about it."""

    id: str
    scene: Scene
    question: Question

    @property
    def small_target(self) -> bool:
        """All targets are small objects (the study's small-target split); False without targets."""
        targets = [self.scene.objects[t] for t in self.question.targets]
        return bool(targets) and all(o.small for o in targets)


# ------------------------------------------------------------------------------------------- generation


def make_eval_set(seed: int, n: int) -> list[Item]:
    """``n`` answer-balanced items, categories taking turns; a pure function of (seed, n)."""
    return [_eval_item(seed, i) for i in range(n)]


def _eval_item(seed: int, i: int) -> Item:
    """Item i of the eval set of ``seed``: category by turn, answer dealt from a shuffled cycle."""
    c = i % len(CATEGORIES)
    category, j = CATEGORIES[c], i // len(CATEGORIES)
    answer = dealt_answer(ANSWERS[category], [seed, EVAL_STREAM, ANSWER_DEAL, c], j)
    scene, question = sample_question(np.random.default_rng([seed, EVAL_STREAM, SCENE_DRAW, i]), category, answer)
    return Item(f"eval-{seed}-{i}", scene, question)


def dealt_answer(answers: tuple[str, ...], key: list[int], j: int) -> str:
    """The j-th answer of a category's deal: full cycles of ``answers``, each shuffled by a generator seeded with
    ``key`` and the cycle number, so every answer occurs equally often up to one incomplete cycle."""
    deal = np.random.default_rng(key + [j // len(answers)]).permutation(len(answers))
    return answers[int(deal[j % len(answers)])]


def train_item(seed: int, step: int) -> Item:
    """Training item number ``step``: uniform category, then uniform answer; a pure function of its arguments,
    so a prefetching loader can produce any step independently."""
    rng = np.random.default_rng([seed, TRAIN_STREAM, step])
    category = pick(rng, CATEGORIES)
    scene, question = sample_question(rng, category, pick(rng, ANSWERS[category]))
    return Item(f"train-{seed}-{step}", scene, question)


def make_train_stream(seed: int, start: int = 0) -> Iterator[Item]:
    """Endless ``train_item(seed, start)``, ``train_item(seed, start + 1)``, ..."""
    step = start
    while True:
        yield train_item(seed, step)
        step += 1


# ---------------------------------------------------------------------------------------------- storage


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 of the raw RGB bytes, prefixed with the size so different sizes never collide."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return hashlib.sha256(f"{arr.shape[1]}x{arr.shape[0]}:".encode() + arr.tobytes()).hexdigest()


def save_set(path: str | Path, items: list[Item], hash_sizes: tuple[int, ...] = HASH_SIZES) -> None:
    """Write scene specs, Q/A, category, targets and per-size pixel hashes as JSON (gzip if ``.gz``).
    The bytes are a deterministic function of the items."""
    write_set(path, FORMAT, hash_sizes, [_entry(it, hash_sizes) for it in items])


def write_set(path: str | Path, fmt: str, hash_sizes: tuple[int, ...], entries: list[dict]) -> None:
    """A stored set's JSON (gzip if ``.gz``; no timestamp, sorted keys), so its bytes depend on the entries only."""
    doc = {"format": fmt, "hash_sizes": list(hash_sizes), "items": entries}
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    Path(path).write_bytes(gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def read_set(path: str | Path, fmt: str, limit: int | None = None) -> list[dict]:
    """The entries (or the first ``limit``) of a set written by ``write_set`` in format ``fmt``."""
    raw = Path(path).read_bytes()
    doc = json.loads(gzip.decompress(raw) if str(path).endswith(".gz") else raw)
    if doc.get("format") != fmt:
        raise IntegrityError(f"{path}: format {doc.get('format')!r}, expected {fmt!r}")
    entries = doc["items"]
    if limit is not None and not 1 <= limit <= len(entries):
        raise ValueError(f"{path} has {len(entries)} items; cannot load {limit}")
    return entries[:limit]


def _entry(item: Item, hash_sizes: tuple[int, ...]) -> dict:
    """One item as a JSON-ready dict."""
    q = item.question
    return {
        "id": item.id, "scene": item.scene.to_dict(), "question": q.text, "answer": q.answer,
        "category": q.category, "targets": list(q.targets),
        "pixel_sha256": {str(s): pixel_hash(render(item.scene, s)) for s in hash_sizes},
    }


def load_set(path: str | Path, image_size: int, limit: int | None = None) -> list[tuple[Item, Image.Image]]:
    """Read a saved set and render every item (or the first ``limit``) at ``image_size``, verifying it first.

    Each image is checked against its stored hash; when ``image_size`` has none, the item is rendered and
    checked at the smallest stored size instead. Each question must still be a valid question of its scene,
    with the same answer and targets. Raises ``IntegrityError`` naming the first item that fails."""
    return [_load_entry(e, image_size) for e in read_set(path, FORMAT, limit)]


def _load_entry(entry: dict, image_size: int) -> tuple[Item, Image.Image]:
    """Rebuild, render and verify one stored item."""
    scene = Scene.from_dict(entry["scene"])
    question = Question(entry["question"], entry["answer"], entry["category"], tuple(entry["targets"]))
    if question not in questions_for(scene, question.category):
        raise IntegrityError(f"item {entry['id']}: question {question.text!r} -> {question.answer!r} "
                             f"(targets {question.targets}) does not hold for its scene")
    image = render(scene, image_size)
    hashes = entry["pixel_sha256"]
    check_size = str(image_size) if str(image_size) in hashes else min(hashes, key=int)
    check = image if check_size == str(image_size) else render(scene, int(check_size))
    if pixel_hash(check) != hashes[check_size]:
        raise IntegrityError(f"item {entry['id']}: rendered pixels at {check_size} px do not match the stored "
                             "SHA-256 (edited scene spec, or a numpy/Pillow version that renders differently)")
    return Item(entry["id"], scene, question), image


# --------------------------------------------------------------------------------------- targets, stats


def target_boxes(item: Item, image_size: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes [x0, x1) x [y0, y1) of the question's targets at ``image_size``, in target order."""
    return [pixel_box(item.scene.objects[t], image_size) for t in item.question.targets]


def target_token_indices(item: Item, image_size: int, patch: int, merge: int = 1) -> list[int]:
    """Raster indices (row-major) of the visual-token cells that contain a drawn pixel of a target.

    A token covers ``patch * merge`` pixels square: LLaVA at 168 px, patch 14 -> 12x12 tokens; Qwen2-VL at
    224 px, patch 14, merge 2 -> 8x8 merged tokens (which Qwen2-VL also orders row-major). Uses the drawn
    pixels, not the boxes, so a triangle's empty corners do not count."""
    return object_token_indices(item.scene, item.question.targets, image_size, patch, merge)


def object_token_indices(scene: Scene, objects: Sequence[int], image_size: int, patch: int, merge: int = 1
                         ) -> list[int]:
    """Raster indices of the token cells holding a drawn pixel of any of ``objects`` (indices into the scene)."""
    cell = patch * merge
    if image_size % cell:
        raise ValueError(f"image_size {image_size} is not a multiple of patch * merge = {cell}")
    grid = image_size // cell
    mask = render_mask(scene, image_size)
    ys, xs = np.nonzero(np.isin(mask, [t + 1 for t in objects]))
    return sorted({int(v) for v in (ys // cell) * grid + xs // cell})


def majority_baseline(items: list[Item]) -> dict[str, float]:
    """Per category, the accuracy of always answering that category's most frequent answer."""
    by_category: dict[str, Counter] = {}
    for it in items:
        by_category.setdefault(it.question.category, Counter())[it.question.answer] += 1
    return {c: max(cnt.values()) / sum(cnt.values()) for c, cnt in by_category.items()}
