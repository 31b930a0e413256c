"""The shipped held-out set as harness task folders (``tasks: - testbed: llava`` in a sweep YAML).

``heldout.json.gz`` holds ``make_eval_set(HELDOUT_SEED, HELDOUT_N)`` as scene specs + Q/A with pixel hashes
(``python -m vtprune.testbed.export --write-heldout`` regenerates it). ``write_task`` renders its first ``size`` items
for one family (checking every pixel hash) into an ordinary task folder (:mod:`vtprune.harness.tasks`):

* ``category``: the question category; ``tags``: ``retrieval`` for every category but counting (counting moves with
  the number of tokens, not only with lost information: README, "The testbed"), ``small_target`` when every target
  is a small object;
* ``targets``: the target objects; ``token_priority``: per visual token of the family's grid (LLaVA 12x12, Qwen2-VL
  8x8 merged), ``question`` = 2 on the question's targets, 1 on other objects, 0 on background, and ``objects`` = 1
  on any object. The ``informed`` pruner reads them: the question-aware and object references of the leaderboard.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

from ..harness.tasks import write_task_folder
from .dataset import Item, load_set, make_eval_set, object_token_indices, save_set
from .model import FAMILIES, IMAGE_SIZE, MERGE, PATCH, num_image_tokens

HELDOUT_FILE = Path(__file__).parent / "heldout.json.gz"
HELDOUT_SEED = 777  # the held-out set that checkpoints are scored on (training never draws from this stream)
HELDOUT_N = 1200  # 200 per category


def token_priorities(item: Item, family: str) -> dict[str, list[int]]:
    """``question`` (2 target / 1 other object / 0 background) and ``objects`` (1 object / 0) per visual token."""
    size, merge = IMAGE_SIZE[family], (1 if family == "llava" else MERGE)
    targets = set(object_token_indices(item.scene, item.question.targets, size, PATCH, merge))
    objects = set(object_token_indices(item.scene, range(len(item.scene.objects)), size, PATCH, merge))
    n = num_image_tokens(family)
    return {"question": [2 if t in targets else int(t in objects) for t in range(n)],
            "objects": [int(t in objects) for t in range(n)]}


def _rows(source: Path, family: str, size: int) -> Iterator[tuple[dict, Callable[[Path], None]]]:
    """data.jsonl entries (with image savers) of the first ``size`` stored items; lazy, so nothing is loaded or
    rendered when the task folder already exists."""
    for i, (item, image) in enumerate(load_set(source, IMAGE_SIZE[family], limit=size)):
        q = item.question
        tags = (["retrieval"] if q.category != "counting" else []) + (["small_target"] if item.small_target else [])
        entry = {"id": item.id, "image": f"images/{i:04d}.png", "question": q.text, "answer": q.answer,
                 "category": q.category, "tags": tags, "targets": list(q.targets),
                 "token_priority": token_priorities(item, family)}
        yield entry, image.save


def write_task(folder: str | Path, family: str, size: int, source: str | Path = HELDOUT_FILE) -> Path:
    """The first ``size`` held-out items rendered for ``family`` as a task folder (kept if it exists)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown testbed family {family!r}; expected one of {FAMILIES}")
    return write_task_folder(Path(folder), _rows(Path(source), family, size), {
        "name": f"testbed-{family}-{size}", "metric": "exact_match",
        "description": f"vtprune testbed held-out questions 0..{size - 1} ({Path(source).name}), "
                       f"rendered for {family}"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-heldout", action="store_true", help=f"regenerate {HELDOUT_FILE.name}")
    parser.add_argument("--family", choices=FAMILIES)
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
