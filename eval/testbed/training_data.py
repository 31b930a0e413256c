"""Training batches for the testbed VLMs, each a pure function of (family, seed, step, batch size).

* Stage 1 (vision pretraining, a stand-in for CLIP pretraining): pixel values plus dense per-patch labels
  read off ``render_mask`` (colour, shape and size class of the object covering most of the patch, whether an
  object's centre lies in the patch, and the patch's row and column; each family's recipe picks which it
  trains) and, for LLaVA's [CLS], the set of colours, shapes and (colour, shape) pairs present.
* Stage 2 (instruction tuning): multi-turn sequences built with the family's processor, exactly as at
  evaluation time: every question that finds an object by shape first, then other questions, then
  training-only list turns (``list the {shapes} ?``, ``list the {colour} objects ?``) and a caption turn;
  labels only on answers, lists and caption, each with its ``<eos>``. ``segments`` numbers each token's turn,
  from which ``train.stage2_inputs`` builds the isolated-turn mask and positions.

Stage 1 draws scenes from ``train_item(seed, STAGE1_OFFSET + k)`` and stage 2 from ``train_item(seed, k)``,
so the two stages never share an image; the held-out sets come from a different seed stream altogether.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from vtprune.testbed.dataset import Item, train_item
from vtprune.testbed.model import CAPTION_PROMPT, EOS, IMAGE_PREFIX, IMAGE_SIZE, MERGE, PATCH, TEMPORAL_PATCH, VIDEO_PREFIX
from vtprune.testbed.questions import (ANSWERS, CATEGORIES, PLURALS, Question, all_questions, looks_up_by_shape,
                                       sample_question)
from vtprune.testbed.scenes import COLOUR_NAMES, QUADRANTS, SHAPES, Obj, Scene, pick, render, render_mask
from vtprune.testbed.video import (DIRECTIONS, VIDEO_CATEGORIES, VIDEO_SIZE, Video, VideoQuestion, all_video_questions,
                                   video_train_item)

STAGE1_OFFSET = 10**9  # stage-1 scenes are train items [1e9, ...), stage 2 uses [0, ...)
QA_STREAM = 3  # seed stream for choosing the extra questions of a stage-2 image
HIGH_COUNT_STREAM = 4  # seed stream for swapping a stage-2 image for a high-count scene
HIGH_COUNTS: tuple[str, ...] = ANSWERS["counting"][3:]  # "three", "four", "five"
QA_PER_IMAGE = 20  # question turns per stage-2 image (fewer when the scene has fewer distinct questions)
MIN_PIXELS = 4  # an object labels a patch only if it covers at least this many of its pixels
SIZE_CLASSES = ("none", "small", "large")
CLS_TARGETS = len(COLOUR_NAMES) + len(SHAPES) + len(COLOUR_NAMES) * len(SHAPES)
EVENT_CLASSES = ("none", "appears", "disappears")  # video stage 1: what happens to a patch's object in its group
VIDEO_STAGE1_OFFSET = 10**9  # video stage-1 clips are video train items [1e9, ...), stage 2 uses [0, ...)
VIDEO_QA = 12  # question turns per stage-2 video at most (a video has about 5 valid questions)


@dataclass
class DenseTargets:
    """Per-patch class labels, [batch, patches] each, in the order the vision tower emits patches."""

    colour: torch.Tensor  # 0 = no object, 1 + colour index
    shape: torch.Tensor  # 0 = no object, 1 + shape index
    size: torch.Tensor  # index into SIZE_CLASSES
    centre: torch.Tensor  # 1 if an object's centre lies in the patch
    row: torch.Tensor
    col: torch.Tensor


@dataclass
class VideoDenseTargets(DenseTargets):
    """Per-patch labels of every temporal group of a video: the image labels plus what the object does."""

    motion: torch.Tensor  # 0 = still, 1 + index into DIRECTIONS
    event: torch.Tensor  # index into EVENT_CLASSES


@dataclass
class Stage1Batch:
    """Processor outputs for the images, dense targets, and [CLS] multi-hot targets [batch, CLS_TARGETS]."""

    inputs: dict[str, torch.Tensor]
    dense: DenseTargets
    cls: torch.Tensor


# ---------------------------------------------------------------------------------------------- stage 1


def stage1_batch(processor, family: str, seed: int, step: int, batch: int) -> Stage1Batch:
    """Images ``STAGE1_OFFSET + step * batch + b`` of the seed's training stream, with their labels."""
    scenes = [train_item(seed, STAGE1_OFFSET + step * batch + b).scene for b in range(batch)]
    size = IMAGE_SIZE[family]
    inputs = dict(processor.image_processor([render(s, size) for s in scenes], return_tensors="pt"))
    labels = [patch_labels(s, size) for s in scenes]
    order = patch_order(family)
    dense = DenseTargets(*(torch.from_numpy(np.stack([lab[i] for lab in labels])[:, order])
                           for i in range(len(labels[0]))))
    return Stage1Batch(inputs, dense, torch.from_numpy(np.stack([cls_target(s) for s in scenes])))


def patch_labels(scene: Scene, size: int) -> tuple[np.ndarray, ...]:
    """Raster-order labels of the ``size // PATCH`` square grid, in ``DenseTargets`` field order."""
    grid = size // PATCH
    main, covered = main_objects([render_mask(scene, size)], len(scene.objects), size)
    objs = scene.objects
    colour = np.where(covered, [1 + COLOUR_NAMES.index(objs[m].colour) for m in main], 0)
    shape = np.where(covered, [1 + SHAPES.index(objs[m].shape) for m in main], 0)
    size_class = np.where(covered, [1 if objs[m].small else 2 for m in main], 0)
    centre = np.zeros(grid * grid, dtype=np.int64)
    for o in objs:
        centre[min(int(o.cy * grid), grid - 1) * grid + min(int(o.cx * grid), grid - 1)] = 1
    cells = np.arange(grid * grid)
    return tuple(a.astype(np.int64) for a in (colour, shape, size_class, centre, cells // grid, cells % grid))


def main_objects(masks: list[np.ndarray], n_objects: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per raster patch of the ``size // PATCH`` grid, the object (index) covering most of its pixels summed over
    ``masks`` (object-id maps, 0 = background), and whether that object covers at least MIN_PIXELS of them."""
    grid = size // PATCH
    cells = [m.reshape(grid, PATCH, grid, PATCH).transpose(0, 2, 1, 3).reshape(grid * grid, -1) for m in masks]
    counts = np.stack([sum((c == i + 1).sum(1) for c in cells) for i in range(n_objects)], 1)  # [patches, objects]
    return counts.argmax(1), counts.max(1) >= MIN_PIXELS


def patch_order(family: str) -> np.ndarray:
    """Raster index of each patch in the tower's order: raster for CLIP; for Qwen2-VL, the processor emits
    each 2x2 merge block's patches together (block rows, block columns, then row and column inside)."""
    grid = IMAGE_SIZE[family] // PATCH
    if family == "llava":
        return np.arange(grid * grid)
    r, c = np.divmod(np.arange(grid * grid), grid)
    emitted = ((r // MERGE) * (grid // MERGE) + c // MERGE) * MERGE * MERGE + (r % MERGE) * MERGE + c % MERGE
    return np.argsort(emitted)


def cls_target(scene: Scene) -> np.ndarray:
    """Multi-hot: colours present, shapes present, (colour, shape) pairs present."""
    out = np.zeros(CLS_TARGETS, dtype=np.float32)
    n_c, n_s = len(COLOUR_NAMES), len(SHAPES)
    for o in scene.objects:
        c, s = COLOUR_NAMES.index(o.colour), SHAPES.index(o.shape)
        out[[c, n_c + s, n_c + n_s + c * n_s + s]] = 1.0
    return out


# ---------------------------------------------------------------------------------------------- stage 2


def stage2_batch(processor, family: str, seed: int, step: int, batch: int, extra_counts: int = 0,
                 high_counts: float = 0.0) -> dict[str, torch.Tensor]:
    """Processor outputs plus ``labels`` and turn ``segments`` for stage-2 images ``step * batch + b``
    (``stage2_item``); ``extra_counts`` as in ``pick_questions``."""
    size = IMAGE_SIZE[family]
    texts, masks, images, turns = [], [], [], []
    for b in range(batch):
        k = step * batch + b
        item = stage2_item(seed, k, high_counts)
        words, supervised = conversation(family, item.scene, pick_questions(item.scene, item.question, seed, k,
                                                                                 extra_counts))
        texts.append(" ".join(words))
        masks.append(supervised)
        turns.append(turn_ids(words))
        images.append(render(item.scene, size))
    inputs = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    inputs["labels"] = answer_labels(inputs["input_ids"], masks)
    inputs["segments"] = turn_segments(inputs["attention_mask"], turns)
    return inputs


def stage2_item(seed: int, k: int, high_counts: float = 0.0) -> Item:
    """Stage-2 image ``k``: ``train_item(seed, k)``, or with probability ``high_counts`` a scene planned for a
    counting question answered three to five. Scenes drawn for the other categories rarely hold more than two
    look-alikes, so without the swap "four" and "five" are 1.7 % and 0.5 % of the counting turns (Qwen2-VL's
    recipe, 1,500 images) while the held-out set asks each of zero..five equally; the model then undercounts."""
    if high_counts > 0:
        rng = np.random.default_rng([seed, HIGH_COUNT_STREAM, k])
        if rng.random() < high_counts:
            scene, question = sample_question(rng, "counting", pick(rng, HIGH_COUNTS))
            return Item(f"train-{seed}-{k}-count", scene, question)
    return train_item(seed, k)


def turn_ids(words: list[str]) -> list[int]:
    """Per word after the image prefix: 1 + the number of ``<eos>`` before it, i.e. which turn it belongs to."""
    out, turn = [], 1
    for w in words[1:]:
        out.append(turn)
        turn += w == EOS
    return out


def turn_segments(padding: torch.Tensor, turns: list[list[int]]) -> torch.Tensor:
    """Per token of the left-padded batch: -1 for padding, 0 for the image prefix, else its turn number."""
    n, length = padding.shape
    seg = torch.full((n, length), -1, dtype=torch.long)
    for row, ids in enumerate(turns):
        seg[row, length - int(padding[row].sum()):] = 0
        seg[row, length - len(ids):] = torch.tensor(ids)
    return seg


def isolated_mask(segments: torch.Tensor) -> torch.Tensor:
    """A 4-D boolean attention mask [batch, 1, L, L] under which every turn sees the image prefix and itself
    only. A multi-turn row then trains exactly what evaluation asks (one question per image), and no turn can
    copy its answer from an earlier one (with 20 turns, "is there a red square ?" often followed "what colour is
    the square ? red"). Padding rows see themselves, so no softmax row is empty."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keys = segments[:, None, :]
    mask = causal & ((segments[:, :, None] == keys) | (keys == 0)) & (keys >= 0)
    return (mask | torch.eye(length, dtype=torch.bool))[:, None]


def isolated_positions(standard: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Position ids ([..., batch, L], e.g. Qwen2-VL's 3 M-RoPE rows) with every turn restarting where the first
    turn starts in ``standard`` (the ids of the plain multi-turn row), so a turn sits exactly where a single-turn
    prompt's question does; the image prefix keeps its ids."""
    index = torch.arange(segments.shape[1]).expand_as(segments)
    start = torch.stack([torch.searchsorted(s.contiguous(), s.contiguous()) for s in segments.clamp(min=0)])
    first = (segments <= 0).sum(1, keepdim=True)  # where turn 1 starts
    first_pos = standard.gather(-1, first.expand(*standard.shape[:-1], 1).contiguous())
    turned = first_pos + index - start
    return torch.where(segments >= 1, turned, standard)


def pick_questions(scene: Scene, first: Question, seed: int, k: int, extra_counts: int = 0) -> list[Question]:
    """``first``, then every other question that looks an object up by shape (``looks_up_by_shape``), then other
    questions until there are QA_PER_IMAGE, then up to ``extra_counts`` more counting questions, all in random
    order. The fill lets categories take turns; within a category (and for the extra counts) the answer is drawn
    uniformly among the answers still available, then a question with that answer, so frequent answers (e.g.
    "zero") do not dominate.

    Asking every shape lookup first fixes the stall of the first recipes, where categories simply took turns
    (about 1.3 colour questions per image): the models learned to find objects by colour and stayed at
    32-44 % on "what colour is the {shape}" (docs/testbed_runs.md). Extra counts are for the family that learns
    counting slowest (Qwen2-VL, 56 % after the plain mix)."""
    rng = np.random.default_rng([seed, QA_STREAM, k])
    others = [q for q in all_questions(scene) if q.text != first.text]
    chosen = [first] + [q for q in others if looks_up_by_shape(q)][:QA_PER_IMAGE - 1]
    pool: dict[str, dict[str, list[Question]]] = {c: defaultdict(list) for c in CATEGORIES}
    for q in others:
        if not looks_up_by_shape(q):
            pool[q.category][q.answer].append(q)
    while len(chosen) < QA_PER_IMAGE and any(pool.values()):
        for c in rng.permutation(len(CATEGORIES)):
            if pool[CATEGORIES[c]] and len(chosen) < QA_PER_IMAGE:
                chosen.append(_draw(pool[CATEGORIES[c]], rng))
    for _ in range(extra_counts):
        if pool["counting"]:
            chosen.append(_draw(pool["counting"], rng))
    return [chosen[i] for i in rng.permutation(len(chosen))]


def _draw(by_answer: dict[str, list[Question]], rng: np.random.Generator) -> Question:
    """Remove and return a question of ``by_answer``: a uniformly drawn answer, then one of its questions."""
    answer = sorted(by_answer)[int(rng.integers(len(by_answer)))]
    question = by_answer[answer].pop(int(rng.integers(len(by_answer[answer]))))
    if not by_answer[answer]:
        del by_answer[answer]
    return question


def caption(scene: Scene) -> list[str]:
    """The objects as ``[small] colour shape quadrant`` phrases in a canonical order (quadrant, colour,
    shape, size), so the caption is a function of the scene alone. (A shape-first order, tried to force
    shape-keyed retrieval, kept stage 2 on the text-prior plateau: 33 % validation after 900 steps.)"""
    def key(o: Obj) -> tuple[int, int, int, bool]:
        return QUADRANTS.index(o.quadrant), COLOUR_NAMES.index(o.colour), SHAPES.index(o.shape), not o.small
    words: list[str] = []
    for o in sorted(scene.objects, key=key):
        words += (["small"] if o.small else []) + [o.colour, o.shape, o.quadrant]
    return words


def attribute_lists(scene: Scene) -> list[tuple[list[str], list[str]]]:
    """Training-only list turns, cheap and always available practice at both lookups the questions need:
    ``list the {shapes} ?`` -> the colours of the objects of that shape, one turn per shape present, and
    ``list the {colour} objects ?`` -> their shapes, one turn per colour present (canonical answer order)."""
    turns = []
    for s in SHAPES:
        colours = sorted((o.colour for o in scene.objects if o.shape == s), key=COLOUR_NAMES.index)
        if colours:
            turns.append((["list", "the", PLURALS[s], "?"], colours))
    for c in COLOUR_NAMES:
        shapes = sorted((o.shape for o in scene.objects if o.colour == c), key=SHAPES.index)
        if shapes:
            turns.append((["list", "the", c, "objects", "?"], shapes))
    return turns


def conversation(family: str, scene: Scene, questions: list[Question]) -> tuple[list[str], list[bool]]:
    """The training sequence as words (the image prefix is the first "word") and, per word, whether the
    loss sees it: answers, the attribute lists and the caption, each with its ``<eos>``."""
    turns = question_turns(IMAGE_PREFIX[family], questions) + attribute_lists(scene)
    return turn_words(turns + [(CAPTION_PROMPT.split(" "), caption(scene))])


def question_turns(prefix: str, questions: list[Question]) -> list[tuple[list[str], list[str]]]:
    """(asked words, answer words) per question; the first turn starts with the visual ``prefix`` as one word."""
    return [(([prefix] if i == 0 else []) + q.text.split(" "), [q.answer]) for i, q in enumerate(questions)]


def turn_words(turns: list[tuple[list[str], list[str]]]) -> tuple[list[str], list[bool]]:
    """(asked words, answer words) turns as one word sequence, each answer followed by ``<eos>``, and per word
    whether the loss sees it (the answers and their ``<eos>``)."""
    words, supervised = [], []
    for ask, answer in turns:
        words += ask + answer + [EOS]
        supervised += [False] * len(ask) + [True] * (len(answer) + 1)
    return words, supervised


def answer_labels(input_ids: torch.Tensor, supervised: list[list[bool]]) -> torch.Tensor:
    """Labels (-100 = ignored) for left-padded ids. The processor expands only the first word (the image
    prefix) into several tokens, and every other word is one token, so each row's last words are its last
    tokens."""
    labels = torch.full_like(input_ids, -100)
    for row, flags in enumerate(supervised):
        tail = torch.tensor(flags[1:])
        ids = input_ids[row, -len(tail):]
        labels[row, -len(tail):] = torch.where(tail, ids, torch.full_like(ids, -100))
    return labels


# ------------------------------------------------------------------------------------------------ video


def video_stage1_batch(processor, seed: int, step: int, batch: int) -> Stage1Batch:
    """Video clips ``VIDEO_STAGE1_OFFSET + step * batch + b`` as processor outputs with per-patch labels of every
    temporal group (groups in order, each in the tower's patch order); no [CLS] targets (Qwen2-VL has none)."""
    videos = [video_train_item(seed, VIDEO_STAGE1_OFFSET + step * batch + b).video for b in range(batch)]
    inputs = dict(processor.video_processor([v.array(VIDEO_SIZE) for v in videos], return_tensors="pt"))
    order = patch_order("qwen2_vl")
    labels = [video_patch_labels(v, VIDEO_SIZE) for v in videos]
    fields = [torch.from_numpy(np.stack([np.concatenate([g[i][order] for g in lab]) for lab in labels]))
              for i in range(len(labels[0][0]))]
    return Stage1Batch(inputs, VideoDenseTargets(*fields), torch.zeros(batch, 0))


def video_patch_labels(video: Video, size: int) -> list[tuple[np.ndarray, ...]]:
    """Per temporal group, raster-order labels in ``VideoDenseTargets`` field order: the object covering most pixels
    of the patch over the group's two frames gives colour, shape and size; centre marks the patch holding its
    centre at the group's first frame; motion is its direction if it moves, event whether it appears or
    disappears inside the group (events happen at odd frames, so only the group of the event shows one)."""
    grid = size // PATCH
    objs, tracks = video.scene.objects, video.tracks
    cells = np.arange(grid * grid)
    colour = np.array([1 + COLOUR_NAMES.index(o.colour) for o in objs])
    shape = np.array([1 + SHAPES.index(o.shape) for o in objs])
    size_class = np.array([1 if o.small else 2 for o in objs])
    motion = np.array([1 + list(DIRECTIONS).index(t.direction) if t.moves else 0 for t in tracks])
    out = []
    for g in range(0, video.n_frames, TEMPORAL_PATCH):
        inside = range(g + 1, g + TEMPORAL_PATCH)  # an event at one of these frames happens inside the group
        event = np.array([1 if t.first in inside else 2 if t.stop in inside else 0 for t in tracks])
        main, covered = main_objects([video.object_mask(f, size) for f in range(g, g + TEMPORAL_PATCH)], len(objs),
                                     size)
        centre = np.zeros(grid * grid, dtype=np.int64)
        for i in video.visible(g):
            o = video.object_at(i, g)
            centre[min(int(o.cy * grid), grid - 1) * grid + min(int(o.cx * grid), grid - 1)] = 1
        per_patch = [np.where(covered, a[main], 0).astype(np.int64) for a in (colour, shape, size_class, motion, event)]
        out.append((*per_patch[:3], centre, cells // grid, cells % grid, *per_patch[3:]))
    return out


def pick_video_questions(video: Video, first: VideoQuestion, seed: int, k: int) -> list[VideoQuestion]:
    """``first``, then the video's other questions, categories taking turns and answers drawn uniformly within a
    category (as ``pick_questions``), up to VIDEO_QA, in random order."""
    rng = np.random.default_rng([seed, QA_STREAM, VIDEO_STAGE1_OFFSET + k])
    pool: dict[str, dict[str, list[VideoQuestion]]] = {c: defaultdict(list) for c in VIDEO_CATEGORIES}
    for q in all_video_questions(video):
        if q.text != first.text:
            pool[q.category][q.answer].append(q)
    chosen: list[VideoQuestion] = [first]
    while len(chosen) < VIDEO_QA and any(pool.values()):
        for c in rng.permutation(len(VIDEO_CATEGORIES)):
            if pool[VIDEO_CATEGORIES[c]] and len(chosen) < VIDEO_QA:
                chosen.append(_draw(pool[VIDEO_CATEGORIES[c]], rng))
    return [chosen[i] for i in rng.permutation(len(chosen))]


def video_stage2_batch(processor, seed: int, step: int, batch: int) -> dict[str, torch.Tensor]:
    """Processor outputs plus ``labels`` and turn ``segments`` for stage-2 videos ``step * batch + b``: every turn
    a question about the video (isolated turns, as for images), no list or caption turns."""
    texts, masks, videos, turns = [], [], [], []
    for b in range(batch):
        k = step * batch + b
        item = video_train_item(seed, k)
        questions = pick_video_questions(item.video, item.question, seed, k)
        words, supervised = turn_words(question_turns(VIDEO_PREFIX, questions))
        texts.append(" ".join(words))
        masks.append(supervised)
        turns.append(turn_ids(words))
        videos.append(item.video.array(VIDEO_SIZE))
    inputs = dict(processor(text=texts, videos=videos, return_tensors="pt", padding=True))
    inputs["labels"] = answer_labels(inputs["input_ids"], masks)
    inputs["segments"] = turn_segments(inputs["attention_mask"], turns)
    return inputs


# ------------------------------------------------------------------------------------------- prefetching


def prefetch(make: Callable[[int], object], steps: range, depth: int = 2) -> Iterator[object]:
    """``make(s)`` for every s in ``steps``, computed ``depth`` steps ahead in one background thread. Each
    batch is a pure function of its step, so the thread's timing never changes the data."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(make, s) for s in steps[:depth]]
        for i in range(len(steps)):
            if i + depth < len(steps):
                pending.append(pool.submit(make, steps[i + depth]))
            yield pending.pop(0).result()
