"""Short synthetic videos and questions whose answers need time, for the video testbed (issue 18).

A video is a scene of the image testbed (:mod:`.scenes`: objects, grey clutter, a noisy gradient background; the
background and clutter stay still, like a fixed camera) plus one ``Track`` per object over ``N_FRAMES`` = 8 frames:
an object either stays still, moves at a constant speed in one of four directions for the whole video, or is shown
only from an event frame on (it *appears*) or only until one (it *disappears*). Frames render with the image
renderer, so one spec renders at any size, bit-exactly.

Events happen at odd frames, i.e. *inside* a Qwen2-VL temporal patch (2 frames per patch): the patch that holds the
event sees the object in one of its frames only, and a moving object is at two places in every patch. So each
answer is visible locally to the vision tower (within a patch) and also across patches (presence or position
changes between temporal groups); a method that drops the tokens where it happens loses it.

==============  ==============================================  ==============================================
category        templates                                       targets (objects; frames that hold the answer)
==============  ==============================================  ==============================================
direction       which way does the {colour} {shape} move ?      the mover (all frames); left/right/up/down
moving          what colour / shape is the object that moves ?  the only mover (all frames)
appearing       what colour / shape is the object that          the only object that appears (its frames)
                appears ?
disappearing    ... that disappears ?                           the only object that disappears (its frames)
counting        how many objects move ?                         the movers (all frames); zero..three
retrieval       what colour is the {shape} at the start / at    the only {shape} in the first / last frame
                the end ?                                       (that frame); another {shape} of another
                                                                colour is in view at the other end
==============  ==============================================  ==============================================

Every answer needs more than one frame: a direction flips when the frames are reversed, an appearing object becomes
a disappearing one, a disappearance vanishes when the frames after it are dropped, and a retrieval question asked
"at the end" has another answer than "at the start" by construction (tests/test_testbed_video.py checks all four).
Movers are in view in every frame and objects that appear or disappear do not move, so the categories do not mix.

As for images, each category has an enumerator (the single source of truth for answers and targets) and a plan
(what the video must contain for a wanted answer); ``make_video_eval_set`` deals answers from shuffled cycles per
category, ``save_video_set`` / ``load_video_set`` store specs with a SHA-256 of all rendered frames per size, and
``video_token_priorities`` gives the informed references per visual token (temporal group x merged 8x8 grid).
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .dataset import EVAL_STREAM, TRAIN_STREAM, IntegrityError, dealt_answer, read_set, write_set
from .questions import NUMBERS, Question
from .scenes import (COLOUR_NAMES, REF_SIZE, SHAPES, Box, Forbid, Obj, Request, Scene, _apart, _draw_object, pick, render,
                     render_mask, sample_scene)

N_FRAMES = 8
EVENT_FRAMES: tuple[int, ...] = (1, 3, 5, 7)  # odd: inside a 2-frame temporal patch
STEP_PX = (3.0, 5.0)  # motion per frame in reference pixels (168-px scale): 21-35 px over the video
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_SIZE = 224  # Qwen2-VL: 16x16 patches per frame, 8x8 merged tokens per temporal group
VIDEO_HASH_SIZES: tuple[int, ...] = (VIDEO_SIZE,)
VIDEO_FORMAT = "vtprune-testbed-video-1"
VIDEO_STREAM = 5  # sub-stream of the eval and train streams: video items never share a generator with images
ANSWER_DEAL, VIDEO_DRAW = 0, 1
P_EXTRA_ROLE = 0.15  # chance that a distractor moves / appears / disappears when its category allows it
MAX_VIDEO_TRIES = 400
MOVE_COUNTS: tuple[str, ...] = NUMBERS[:4]  # "how many objects move ?" is answered zero..three
VIDEO_HELDOUT_FILE = Path(__file__).parent / "video_heldout.json.gz"
VIDEO_HELDOUT_SEED = 777  # as the image held-out set, on the video sub-stream
VIDEO_HELDOUT_N = 1200  # 200 per category

VIDEO_CATEGORIES: tuple[str, ...] = ("direction", "moving", "appearing", "disappearing", "counting", "retrieval")
VIDEO_ANSWERS: dict[str, tuple[str, ...]] = {
    "direction": tuple(DIRECTIONS),
    "moving": COLOUR_NAMES + SHAPES,
    "appearing": COLOUR_NAMES + SHAPES,
    "disappearing": COLOUR_NAMES + SHAPES,
    "counting": MOVE_COUNTS,
    "retrieval": COLOUR_NAMES,
}
VIDEO_WORDS: tuple[str, ...] = (  # words of the video questions and answers missing from the image VOCAB
    "which", "way", "does", "move", "moves", "that", "appears", "disappears", "at", "start", "end",
    "left", "right", "up", "down",
)
VIDEO_ANSWER_WORDS: tuple[str, ...] = tuple(sorted({a for answers in VIDEO_ANSWERS.values() for a in answers}))
ROLES: tuple[str, ...] = ("still", "moves", "appears", "disappears")


@dataclass(frozen=True)
class Track:
    """How an object changes over the video: per-frame displacement (normalised units, 5 decimals) and the
    frames [first, stop) in which it is drawn."""

    dx: float = 0.0
    dy: float = 0.0
    first: int = 0
    stop: int = N_FRAMES

    @property
    def moves(self) -> bool:
        return self.dx != 0 or self.dy != 0

    @property
    def direction(self) -> str | None:
        """One of DIRECTIONS for a mover, else None."""
        if not self.moves:
            return None
        sign = (int(np.sign(self.dx)), int(np.sign(self.dy)))
        return next(d for d, v in DIRECTIONS.items() if v == sign)


@dataclass(frozen=True)
class Video:
    """A scene whose objects are at their frame-0 places, one track per object, and the number of frames."""

    scene: Scene
    tracks: tuple[Track, ...]
    n_frames: int = N_FRAMES

    def role(self, i: int) -> str:
        """One of ROLES for object ``i`` (relative to this video's length)."""
        t = self.tracks[i]
        if t.moves:
            return "moves"
        if t.first > 0:
            return "appears"
        return "disappears" if t.stop < self.n_frames else "still"

    def visible(self, frame: int) -> list[int]:
        """Indices of the objects drawn in ``frame``."""
        return [i for i, t in enumerate(self.tracks) if t.first <= frame < t.stop]

    def object_at(self, i: int, frame: int) -> Obj:
        """Object ``i`` where it is in ``frame`` (drawn or not)."""
        o, t = self.scene.objects[i], self.tracks[i]
        return replace(o, cx=round(o.cx + frame * t.dx, 5), cy=round(o.cy + frame * t.dy, 5))

    def frame_scene(self, frame: int) -> Scene:
        """The still scene of one frame: the objects drawn in it, in index order."""
        return Scene(tuple(self.object_at(i, frame) for i in self.visible(frame)), self.scene.clutter,
                     self.scene.background)

    def frames(self, size: int) -> list[Image.Image]:
        """Every frame rendered at ``size`` x ``size``: equal to ``render(self.frame_scene(k), size)``, but the still
        background and clutter are drawn once (they are most of the rendering time)."""
        still = render(Scene((), self.scene.clutter, self.scene.background), size)
        out = []
        for k in range(self.n_frames):
            image = still.copy()
            draw = ImageDraw.Draw(image)
            for obj in self.frame_scene(k).objects:
                _draw_object(draw, obj, size, obj.rgb)
            out.append(image)
        return out

    def array(self, size: int) -> np.ndarray:
        """The frames as one uint8 array [frames, size, size, 3], the processor's video input."""
        return np.stack([np.asarray(f) for f in self.frames(size)])

    def object_mask(self, frame: int, size: int) -> np.ndarray:
        """Object-id map of ``frame``: 0 for background, i + 1 where object i (a video index) is drawn."""
        ids = np.array([0] + [i + 1 for i in self.visible(frame)], dtype=np.uint8)
        return ids[render_mask(self.frame_scene(frame), size)]

    def reversed(self) -> Video:
        """The same frames in reverse order (movers turn round, appearing objects disappear and back)."""
        last = self.n_frames - 1
        objects = tuple(self.object_at(i, last) for i in range(len(self.tracks)))
        tracks = tuple(Track(-t.dx + 0.0, -t.dy + 0.0, self.n_frames - t.stop, self.n_frames - t.first)
                       for t in self.tracks)
        return Video(replace(self.scene, objects=objects), tracks, self.n_frames)

    def truncated(self, n: int) -> Video:
        """The first ``n`` frames (objects first drawn later are dropped)."""
        if not 1 <= n <= self.n_frames:
            raise ValueError(f"cannot keep {n} of {self.n_frames} frames")
        keep = [i for i, t in enumerate(self.tracks) if t.first < n]
        return Video(replace(self.scene, objects=tuple(self.scene.objects[i] for i in keep)),
                     tuple(replace(self.tracks[i], stop=min(self.tracks[i].stop, n)) for i in keep), n)

    def to_dict(self) -> dict:
        return {"scene": self.scene.to_dict(), "tracks": [vars(t) for t in self.tracks], "n_frames": self.n_frames}

    @staticmethod
    def from_dict(d: dict) -> Video:
        return Video(Scene.from_dict(d["scene"]), tuple(Track(**t) for t in d["tracks"]), d["n_frames"])


@dataclass(frozen=True)
class VideoQuestion(Question):
    """A question about a video; ``frames`` are the frames that hold its answer (informed references)."""

    frames: tuple[int, ...] = ()


@dataclass(frozen=True)
class VideoItem:
    """One evaluation or training example: a video and one question about it."""

    id: str
    video: Video
    question: VideoQuestion

    @property
    def small_target(self) -> bool:
        """All targets are small objects; False without targets (as ``dataset.Item.small_target``)."""
        targets = [self.video.scene.objects[t] for t in self.question.targets]
        return bool(targets) and all(o.small for o in targets)


# ------------------------------------------------------------------------------------------- enumerators


def _all_frames(video: Video) -> tuple[int, ...]:
    return tuple(range(video.n_frames))


def _with_role(video: Video, role: str) -> list[int]:
    return [i for i in range(len(video.tracks)) if video.role(i) == role]


def _direction_questions(video: Video) -> list[VideoQuestion]:
    """Direction of a mover whose (colour, shape) is unique in the video."""
    objs = video.scene.objects
    out = []
    for i in _with_role(video, "moves"):
        o = objs[i]
        if sum(p.colour == o.colour and p.shape == o.shape for p in objs) == 1:
            out.append(VideoQuestion(f"which way does the {o.colour} {o.shape} move ?", video.tracks[i].direction,
                                     "direction", (i,), _all_frames(video)))
    return out


def _only_one(video: Video, role: str, category: str, verb: str) -> list[VideoQuestion]:
    """Colour and shape of the only object with ``role``, drawn in the frames that show it."""
    ids = _with_role(video, role)
    if len(ids) != 1:
        return []
    o, t = video.scene.objects[ids[0]], video.tracks[ids[0]]
    frames = tuple(range(t.first, t.stop))
    return [VideoQuestion(f"what colour is the object that {verb} ?", o.colour, category, tuple(ids), frames),
            VideoQuestion(f"what shape is the object that {verb} ?", o.shape, category, tuple(ids), frames)]


def _moving_questions(video: Video) -> list[VideoQuestion]:
    return _only_one(video, "moves", "moving", "moves")


def _appearing_questions(video: Video) -> list[VideoQuestion]:
    return _only_one(video, "appears", "appearing", "appears")


def _disappearing_questions(video: Video) -> list[VideoQuestion]:
    return _only_one(video, "disappears", "disappearing", "disappears")


def _counting_questions(video: Video) -> list[VideoQuestion]:
    """How many objects move (when the count has an answer word)."""
    ids = _with_role(video, "moves")
    if len(ids) >= len(MOVE_COUNTS):
        return []
    return [VideoQuestion("how many objects move ?", MOVE_COUNTS[len(ids)], "counting", tuple(ids),
                          _all_frames(video))]


def _retrieval_questions(video: Video) -> list[VideoQuestion]:
    """Colour of the only {shape} drawn in the first (last) frame, when another {shape} of another colour is
    drawn at the other end, so the question cannot be answered without the right frame."""
    ends = {"start": 0, "end": video.n_frames - 1}
    out = []
    for s in SHAPES:
        shown = {w: [i for i in video.visible(f) if video.scene.objects[i].shape == s] for w, f in ends.items()}
        for when, other in (("start", "end"), ("end", "start")):
            if len(shown[when]) != 1:
                continue
            colour = video.scene.objects[shown[when][0]].colour
            if any(video.scene.objects[i].colour != colour for i in shown[other]):
                out.append(VideoQuestion(f"what colour is the {s} at the {when} ?", colour, "retrieval",
                                         tuple(shown[when]), (ends[when],)))
    return out


VIDEO_ENUMERATORS: dict[str, Callable[[Video], list[VideoQuestion]]] = {
    "direction": _direction_questions,
    "moving": _moving_questions,
    "appearing": _appearing_questions,
    "disappearing": _disappearing_questions,
    "counting": _counting_questions,
    "retrieval": _retrieval_questions,
}


def video_questions_for(video: Video, category: str) -> list[VideoQuestion]:
    """Every valid question of ``category`` about ``video``, in a fixed order."""
    return VIDEO_ENUMERATORS[category](video)


def all_video_questions(video: Video) -> list[VideoQuestion]:
    """Every valid question about ``video`` (training draws several per video)."""
    return [q for c in VIDEO_CATEGORIES for q in video_questions_for(video, c)]


# -------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class VideoPlan:
    """What a video needs for a wanted answer: requested objects with their roles (and a direction for movers),
    attributes other objects must avoid, the roles other objects may take, and which questions qualify."""

    requests: tuple[Request, ...]
    roles: tuple[str, ...]
    directions: tuple[str | None, ...]
    forbid: Forbid | None
    free_roles: tuple[str, ...]
    about: Callable[[VideoQuestion], bool]


def _asks(text: str) -> Callable[[VideoQuestion], bool]:
    return lambda q: q.text == text


def _plan_direction(rng: np.random.Generator, answer: str) -> VideoPlan:
    """A uniquely named mover heading ``answer``."""
    c, s = pick(rng, COLOUR_NAMES), pick(rng, SHAPES)
    return VideoPlan((Request(c, s),), ("moves",), (answer,), lambda co, sh, sm: co == c and sh == s, ROLES,
                     _asks(f"which way does the {c} {s} move ?"))


def _plan_only(role: str, verb: str) -> Callable[[np.random.Generator, str], VideoPlan]:
    """The only object with ``role`` has the colour or shape ``answer``; others never take that role."""
    def plan(rng: np.random.Generator, answer: str) -> VideoPlan:
        kind = "colour" if answer in COLOUR_NAMES else "shape"
        request = Request(colour=answer) if kind == "colour" else Request(shape=answer)
        direction = pick(rng, tuple(DIRECTIONS)) if role == "moves" else None
        return VideoPlan((request,), (role,), (direction,), None, tuple(r for r in ROLES if r != role),
                         _asks(f"what {kind} is the object that {verb} ?"))
    return plan


def _plan_counting(rng: np.random.Generator, answer: str) -> VideoPlan:
    """Exactly ``answer`` movers, in random directions."""
    k = MOVE_COUNTS.index(answer)
    return VideoPlan((Request(),) * k, ("moves",) * k, tuple(pick(rng, tuple(DIRECTIONS)) for _ in range(k)), None,
                     ("still", "appears", "disappears"), _asks("how many objects move ?"))


def _plan_retrieval(rng: np.random.Generator, answer: str) -> VideoPlan:
    """A {shape} of colour ``answer`` only at the asked end and one of another colour only at the other end."""
    s, when = pick(rng, SHAPES), pick(rng, ("start", "end"))
    other = pick(rng, tuple(c for c in COLOUR_NAMES if c != answer))
    roles = ("disappears", "appears") if when == "start" else ("appears", "disappears")
    return VideoPlan((Request(answer, s), Request(other, s)), roles, (None, None), lambda co, sh, sm: sh == s, ROLES,
                     _asks(f"what colour is the {s} at the {when} ?"))


VIDEO_PLANS: dict[str, Callable[[np.random.Generator, str], VideoPlan]] = {
    "direction": _plan_direction,
    "moving": _plan_only("moves", "moves"),
    "appearing": _plan_only("appears", "appears"),
    "disappearing": _plan_only("disappears", "disappears"),
    "counting": _plan_counting,
    "retrieval": _plan_retrieval,
}


def sample_video(rng: np.random.Generator, plan: VideoPlan) -> Video | None:
    """A random video holding the plan's objects in their roles; other objects are still, or with probability
    P_EXTRA_ROLE take one of ``plan.free_roles``. None when the objects' paths collide (the caller retries)."""
    scene = sample_scene(rng, plan.requests, plan.forbid)
    if scene is None:
        return None
    # sample_scene shuffles the objects: find the requested ones again (first unmatched object fitting each request)
    assigned: dict[int, int] = {}
    for r, req in enumerate(plan.requests):
        i = next(i for i, o in enumerate(scene.objects) if i not in assigned.values() and _fits(o, req))
        assigned[r] = i
    roles: list[str] = []
    for i in range(len(scene.objects)):
        r = next((r for r, j in assigned.items() if j == i), None)
        if r is not None:
            roles.append(plan.roles[r])
        elif rng.random() < P_EXTRA_ROLE and len(plan.free_roles) > 1:
            roles.append(pick(rng, tuple(x for x in plan.free_roles if x != "still")))
        else:
            roles.append("still")
    directions = {i: plan.directions[r] for r, i in assigned.items()}
    tracks, objects = [], []
    for i, (o, role) in enumerate(zip(scene.objects, roles)):
        track, start = _track(rng, o, role, directions.get(i))
        tracks.append(track)
        objects.append(start)
    video = Video(replace(scene, objects=tuple(objects)), tuple(tracks))
    return video if _paths_clear(video) else None


def _fits(o: Obj, req: Request) -> bool:
    """Whether object ``o`` satisfies every set field of ``req`` (sizes are decided by the sampler)."""
    return (req.colour is None or o.colour == req.colour) and (req.shape is None or o.shape == req.shape) and (
        req.small is None or o.small == req.small)


def _track(rng: np.random.Generator, o: Obj, role: str, direction: str | None) -> tuple[Track, Obj]:
    """A track for ``role`` and the object's frame-0 state; a mover's path is centred on its sampled place."""
    if role == "moves":
        direction = direction or pick(rng, tuple(DIRECTIONS))
        step = round((STEP_PX[0] + rng.random() * (STEP_PX[1] - STEP_PX[0])) / REF_SIZE, 5)
        vx, vy = DIRECTIONS[direction]
        dx, dy = vx * step + 0.0, vy * step + 0.0
        half = (N_FRAMES - 1) / 2
        return Track(dx, dy), replace(o, cx=round(o.cx - half * dx, 5), cy=round(o.cy - half * dy, 5))
    event = EVENT_FRAMES[int(rng.integers(len(EVENT_FRAMES)))]
    if role == "appears":
        return Track(first=event), o
    if role == "disappears":
        return Track(stop=event), o
    return Track(), o


def _swept(video: Video, i: int) -> Box:
    """The box object ``i`` covers over all its frames."""
    a = video.object_at(i, video.tracks[i].first).box
    b = video.object_at(i, video.tracks[i].stop - 1).box
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _paths_clear(video: Video) -> bool:
    """Every swept box stays inside the image (1 reference px from the border) and apart from the others."""
    edge = 1 / REF_SIZE
    boxes = [_swept(video, i) for i in range(len(video.tracks))]
    inside = all(b[0] >= edge and b[1] >= edge and b[2] <= 1 - edge and b[3] <= 1 - edge for b in boxes)
    return inside and all(_apart(a, b) for k, a in enumerate(boxes) for b in boxes[k + 1:])


def sample_video_question(rng: np.random.Generator, category: str, answer: str) -> tuple[Video, VideoQuestion]:
    """A random video and a question of ``category`` answered ``answer`` (read back from the enumerator)."""
    if answer not in VIDEO_ANSWERS.get(category, ()):
        raise ValueError(f"{answer!r} is not an answer of video category {category!r}")
    for _ in range(MAX_VIDEO_TRIES):
        plan = VIDEO_PLANS[category](rng, answer)
        video = sample_video(rng, plan)
        if video is None:
            continue
        matching = [q for q in video_questions_for(video, category) if q.answer == answer and plan.about(q)]
        if matching:
            return video, matching[int(rng.integers(len(matching)))]
    raise RuntimeError(f"no video with a {category!r} question answered {answer!r} in {MAX_VIDEO_TRIES} tries")


def make_video_eval_set(seed: int, n: int) -> list[VideoItem]:
    """``n`` answer-balanced items, categories taking turns; item i depends only on (seed, i)."""
    return [_video_eval_item(seed, i) for i in range(n)]


def _video_eval_item(seed: int, i: int) -> VideoItem:
    c = i % len(VIDEO_CATEGORIES)
    category, j = VIDEO_CATEGORIES[c], i // len(VIDEO_CATEGORIES)
    answer = dealt_answer(VIDEO_ANSWERS[category], [seed, EVAL_STREAM, VIDEO_STREAM, ANSWER_DEAL, c], j)
    rng = np.random.default_rng([seed, EVAL_STREAM, VIDEO_STREAM, VIDEO_DRAW, i])
    video, question = sample_video_question(rng, category, answer)
    return VideoItem(f"video-eval-{seed}-{i}", video, question)


def video_train_item(seed: int, k: int) -> VideoItem:
    """Training video ``k``: uniform category, then uniform answer; never drawn from the eval streams."""
    rng = np.random.default_rng([seed, TRAIN_STREAM, VIDEO_STREAM, k])
    category = pick(rng, VIDEO_CATEGORIES)
    video, question = sample_video_question(rng, category, pick(rng, VIDEO_ANSWERS[category]))
    return VideoItem(f"video-train-{seed}-{k}", video, question)


# ---------------------------------------------------------------------------------------------- storage


def video_hash(video: Video, size: int) -> str:
    """SHA-256 of every rendered frame's RGB bytes, prefixed with the frame count and size."""
    arr = video.array(size)
    return hashlib.sha256(f"{arr.shape[0]}x{size}x{size}:".encode() + arr.tobytes()).hexdigest()


def save_video_set(path: str | Path, items: list[VideoItem], hash_sizes: tuple[int, ...] = VIDEO_HASH_SIZES) -> None:
    """Video specs, Q/A, category, targets, answer frames and per-size frame hashes as deterministic JSON
    (gzip if ``.gz``)."""
    entries = [{"id": it.id, "video": it.video.to_dict(), "question": it.question.text, "answer": it.question.answer,
                "category": it.question.category, "targets": list(it.question.targets),
                "frames": list(it.question.frames),
                "frames_sha256": {str(s): video_hash(it.video, s) for s in hash_sizes}} for it in items]
    write_set(path, VIDEO_FORMAT, hash_sizes, entries)


def load_video_set(path: str | Path, limit: int | None = None) -> list[VideoItem]:
    """Read a saved set (or its first ``limit`` items) and verify it: each question must still be a question of
    its video with the same answer, targets and frames, and the frames must render to every stored hash.
    Raises ``IntegrityError`` naming the first item that fails."""
    out = []
    for e in read_set(path, VIDEO_FORMAT, limit):
        video = Video.from_dict(e["video"])
        question = VideoQuestion(e["question"], e["answer"], e["category"], tuple(e["targets"]), tuple(e["frames"]))
        if question not in video_questions_for(video, question.category):
            raise IntegrityError(f"item {e['id']}: question {question.text!r} -> {question.answer!r} (targets "
                                 f"{question.targets}, frames {question.frames}) does not hold for its video")
        for size, digest in e["frames_sha256"].items():
            if video_hash(video, int(size)) != digest:
                raise IntegrityError(f"item {e['id']}: frames rendered at {size} px do not match the stored SHA-256 "
                                     "(edited spec, or a numpy/Pillow version that renders differently)")
        out.append(VideoItem(e["id"], video, question))
    return out


# ------------------------------------------------------------------------------------- informed targets


def video_token_priorities(item: VideoItem, size: int = VIDEO_SIZE, patch: int = 14, merge: int = 2,
                           temporal: int = 2) -> dict[str, list[int]]:
    """Per visual token (temporal group major, then the merged grid row-major, as Qwen2-VL orders a video):
    ``question`` = 2 where a target is drawn in one of the answer frames of the group, 1 on any other drawn object,
    0 on background; ``objects`` = 1 on any drawn object. The ``informed`` pruner's references for video."""
    video, q = item.video, item.question
    cell = patch * merge
    if size % cell or video.n_frames % temporal:
        raise ValueError(f"size {size} must be a multiple of {cell} and {video.n_frames} frames of {temporal}")
    grid = size // cell
    targets = np.array([t + 1 for t in q.targets], dtype=np.uint8)
    question, objects = [], []
    for g in range(video.n_frames // temporal):
        masks = [(f, video.object_mask(f, size)) for f in range(g * temporal, (g + 1) * temporal)]
        hit = np.zeros((grid, grid), dtype=bool)
        any_obj = np.zeros((grid, grid), dtype=bool)
        for f, mask in masks:
            cells = mask.reshape(grid, cell, grid, cell)
            any_obj |= (cells > 0).any((1, 3))
            if f in q.frames:
                hit |= np.isin(cells, targets).any((1, 3))
        question += np.where(hit, 2, any_obj.astype(int)).flatten().tolist()
        objects += any_obj.astype(int).flatten().tolist()
    return {"question": question, "objects": objects}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-heldout", action="store_true", help=f"regenerate {VIDEO_HELDOUT_FILE.name}")
    args = parser.parse_args(argv)
    if args.write_heldout:
        save_video_set(VIDEO_HELDOUT_FILE, make_video_eval_set(VIDEO_HELDOUT_SEED, VIDEO_HELDOUT_N))
        print(f"wrote {VIDEO_HELDOUT_FILE}")


if __name__ == "__main__":
    main()
