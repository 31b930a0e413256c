"""The shipped held-out sets as harness task folders (``tasks: - testbed: llava`` in a sweep YAML).

``heldout.json.gz`` holds ``make_eval_set(HELDOUT_SEED, HELDOUT_N)`` as scene specs + Q/A with pixel hashes
(``python -m vtprune.testbed.export --write-heldout`` regenerates it). ``write_task`` renders its first ``size`` items
for one family (checking every pixel hash) into an ordinary task folder (:mod:`vtprune.harness.tasks`):

* ``category``: the question category; ``tags``: ``retrieval`` for every category but counting (counting moves with
  the number of tokens, not only with lost information: README, "The testbed"), ``small_target`` when every target
  is a small object;
* ``targets``: the target objects; ``token_priority``: per visual token of the family's grid (LLaVA 12x12, Qwen2-VL
  8x8 merged), ``question`` = 2 on the question's targets, 1 on other objects, 0 on background, and ``objects`` = 1
  on any object. The ``informed`` pruner reads them: the question-aware and object references of the leaderboard.

``testbed: qwen2_vl_video`` (the video testbed, :mod:`.video`) writes the first ``size`` items of
``video_heldout.json.gz`` (frame hashes checked): each question's 8 frames at 224 px as lossless PNGs
(``videos/<i>/<f>.png``, the line's ``video``), and

* ``category``: the video category; ``tags``: ``temporal`` for direction / moving / appearing / disappearing (the
  answer needs several frames), ``retrieval`` for every category but counting, as for images (so ``tag:retrieval``
  is the score unaffected by the token-count effect on counting; the per-frame retrieval questions are the
  *category* ``retrieval``), ``small_target`` when every target is small;
* ``targets``, ``answer_frames`` (the frames that hold the answer) and ``token_priority`` per video token (4 temporal
  groups x 8x8 merged, group-major): ``question`` = 2 on a target drawn in an answer frame of the group, 1 on other
  objects, 0 on background; ``objects`` = 1 on any object (``video.video_token_priorities``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from ..harness.tasks import write_task_folder
from .dataset import Item, load_set, make_eval_set, object_token_indices, save_set
from .model import FAMILIES, IMAGE_SIZE, MERGE, PATCH, num_image_tokens
from .video import VIDEO_HELDOUT_FILE, VIDEO_SIZE, VideoItem, load_video_set, video_token_priorities

HELDOUT_FILE = Path(__file__).parent / "heldout.json.gz"
HELDOUT_SEED = 777  # the held-out set that checkpoints are scored on (training never draws from this stream)
HELDOUT_N = 1200  # 200 per category
VIDEO_TESTBED = "qwen2_vl_video"  # the video testbed's task (its model is the Qwen2-VL testbed fine-tuned on video)
TESTBEDS: tuple[str, ...] = (*FAMILIES, VIDEO_TESTBED)
TEMPORAL_CATEGORIES: tuple[str, ...] = ("direction", "moving", "appearing", "disappearing")


def token_priorities(item: Item, family: str) -> dict[str, list[int]]:
    """``question`` (2 target / 1 other object / 0 background) and ``objects`` (1 object / 0) per visual token."""
    size, merge = IMAGE_SIZE[family], (1 if family == "llava" else MERGE)
    targets = set(object_token_indices(item.scene, item.question.targets, size, PATCH, merge))
    objects = set(object_token_indices(item.scene, range(len(item.scene.objects)), size, PATCH, merge))
    n = num_image_tokens(family)
    return {"question": [2 if t in targets else int(t in objects) for t in range(n)],
            "objects": [int(t in objects) for t in range(n)]}


def _rows(source: Path, family: str, size: int) -> Iterator[tuple[dict, dict[str, Image.Image]]]:
    """data.jsonl entries (with image savers) of the first ``size`` stored items; lazy, so nothing is loaded or
    rendered when the task folder already exists."""
    for i, (item, image) in enumerate(load_set(source, IMAGE_SIZE[family], limit=size)):
        q = item.question
        tags = (["retrieval"] if q.category != "counting" else []) + (["small_target"] if item.small_target else [])
        entry = {"id": item.id, "image": f"images/{i:04d}.png", "question": q.text, "answer": q.answer,
                 "category": q.category, "tags": tags, "targets": list(q.targets),
                 "token_priority": token_priorities(item, family)}
        yield entry, {entry["image"]: image}


def video_tags(item: VideoItem) -> list[str]:
    """``temporal`` (answers that need several frames), ``retrieval`` (every category but counting) and
    ``small_target`` (every target small), in that order."""
    category = item.question.category
    tags = ["temporal"] if category in TEMPORAL_CATEGORIES else []
    return tags + (["retrieval"] if category != "counting" else []) + (["small_target"] if item.small_target else [])


def _video_rows(source: Path, size: int) -> Iterator[tuple[dict, dict[str, Image.Image]]]:
    """data.jsonl entries and frames of the first ``size`` stored video items (lazy, as ``_rows``)."""
    for i, item in enumerate(load_video_set(source, limit=size)):
        q = item.question
        frames = item.video.frames(VIDEO_SIZE)
        paths = [f"videos/{i:04d}/{f:02d}.png" for f in range(len(frames))]
        entry = {"id": item.id, "video": paths, "question": q.text, "answer": q.answer, "category": q.category,
                 "tags": video_tags(item), "targets": list(q.targets), "answer_frames": list(q.frames),
                 "token_priority": video_token_priorities(item)}
        yield entry, dict(zip(paths, frames))


def write_task(folder: str | Path, testbed: str, size: int, source: str | Path | None = None) -> Path:
    """The first ``size`` held-out items of ``testbed`` (an image family, or the video testbed) as a task folder
    (kept if it exists); ``source`` defaults to the shipped held-out file of that testbed."""
    if testbed not in TESTBEDS:
        raise ValueError(f"unknown testbed family {testbed!r}; expected one of {TESTBEDS}")
    video = testbed == VIDEO_TESTBED
    source = Path(source or (VIDEO_HELDOUT_FILE if video else HELDOUT_FILE))
    rows = _video_rows(source, size) if video else _rows(source, testbed, size)
    return write_task_folder(Path(folder), rows, {
        "name": f"testbed-{testbed}-{size}", "metric": "exact_match",
        "description": f"vtprune testbed held-out questions 0..{size - 1} ({source.name}), rendered for {testbed}"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-heldout", action="store_true", help=f"regenerate {HELDOUT_FILE.name}")
    parser.add_argument("--family", choices=TESTBEDS)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.write_heldout:
        save_set(HELDOUT_FILE, make_eval_set(HELDOUT_SEED, HELDOUT_N))
        print(f"wrote {HELDOUT_FILE}")
    if args.family:
        print(write_task(args.out or Path("runs/tasks") / f"testbed-{args.family}-{args.size}", args.family, args.size))


if __name__ == "__main__":
    main()
