"""A generated local task (``synthetic: shapes``): coloured shapes on a noisy background, four question categories.

It exists so that a sweep runs anywhere without data: the folder it writes is an ordinary task folder
(:mod:`.tasks`). Item ``i`` depends only on ``(seed, i)``. Each question carries its ``targets`` (object indices) and
the tag ``small_target`` when every target is small, like the testbed's exported tasks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from .metrics import NUMBER_WORDS

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
SIDE = 112
CATEGORIES = ("colour", "shape", "count", "exist")
DIGIT_WORDS = {v: k for k, v in NUMBER_WORDS.items()}


def _scene(rng: np.random.Generator) -> list[dict]:
    """1-3 objects of distinct (colour, shape), non-overlapping, each small (10-14 px) or large (26-36 px)."""
    objects: list[dict] = []
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    count = int(rng.integers(1, 4))
    while len(objects) < count:
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        size = int(rng.integers(10, 15)) if rng.random() < 0.4 else int(rng.integers(26, 37))
        x, y = (int(v) for v in rng.integers(2, SIDE - size - 2, 2))
        box = (x, y, x + size, y + size)
        clash = any(o["colour"] == colour and o["shape"] == shape or _overlap(o["box"], box) for o in objects)
        if not clash:
            objects.append({"colour": colour, "shape": shape, "box": box, "small": size < 20})
    return objects


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return not (a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1])


def _render(objects: list[dict], rng: np.random.Generator) -> Image.Image:
    noise = rng.normal(60, 8, (SIDE, SIDE, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse(o["box"], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle(o["box"], fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def _question(objects: list[dict], category: str, rng: np.random.Generator) -> tuple[str, str, list[int]]:
    """(question, answer, target indices) of ``category``; falls back to counting when no referent is unique."""
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    if category == "colour":
        unique = [i for i, s in enumerate(shapes) if shapes.count(s) == 1]
        if unique:
            i = unique[int(rng.integers(len(unique)))]
            return f"what is the colour of the {shapes[i]}", colours[i], [i]
    if category == "shape":
        unique = [i for i, c in enumerate(colours) if colours.count(c) == 1]
        if unique:
            i = unique[int(rng.integers(len(unique)))]
            return f"what shape is the {colours[i]} object", shapes[i], [i]
    if category == "exist":
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        hits = [i for i, o in enumerate(objects) if (o["colour"], o["shape"]) == (colour, shape)]
        return f"is there a {colour} {shape}", "yes" if hits else "no", hits
    return "how many objects are there", DIGIT_WORDS[str(len(objects))], list(range(len(objects)))


def write_shapes_task(folder: Path, size: int, seed: int = 0) -> Path:
    """Write the task once (atomically: built aside, then renamed into place); an existing folder is kept."""
    folder = Path(folder)
    if (folder / "data.jsonl").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    rows = []
    for i in range(size):
        rng = np.random.default_rng([seed, i])
        objects = _scene(rng)
        category = CATEGORIES[i % len(CATEGORIES)]
        question, answer, targets = _question(objects, category, rng)
        category = "count" if question.startswith("how many") else category
        _render(objects, rng).save(tmp / "images" / f"{i:04d}.png")
        small = bool(targets) and all(objects[t]["small"] for t in targets)
        rows.append({"id": f"shapes-{i:04d}", "image": f"images/{i:04d}.png", "question": question, "answer": answer,
                     "category": category, "tags": ["small_target"] if small else [], "targets": targets})
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "task.yaml").write_text(yaml.safe_dump({
        "name": f"shapes-{size}", "metric": "exact_match", "prompt_suffix": "Answer with one word.",
        "description": f"generated by vtprune.harness.synthetic (seed {seed})"}, sort_keys=False))
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
