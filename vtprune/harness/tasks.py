"""Local task folders: ``data.jsonl`` (one question per line) + the images and video frames it names + an optional
``task.yaml``.

A line::

    {"id": "q7", "image": "images/7.png", "question": "what colour is the circle", "answer": "red",
     "category": "colour", "tags": ["small_target"], "targets": [2]}
    {"id": "v3", "video": ["videos/0003/00.png", "videos/0003/01.png", ...], "question": "which way does ...", ...}

* ``image`` (one path) or ``images`` (a list), relative to the folder, and/or ``video``: the frames of one video, in
  order (a non-empty list of image files of one size). A question has images, a video, or both (the prompt shows
  the images first, then the video).
* ``answer`` (a string) or ``answers`` (a list: every accepted answer, e.g. VQAv2's 10 human answers).
* ``choices`` (a list) for multiple choice; the answer is then a letter ("B") or the text of one choice.
* ``category`` (optional) and ``tags`` (optional list) give per-category and per-tag scores.
* Any other field (``targets``, ...) is carried through to the per-question predictions file untouched.

``task.yaml`` may set ``name``, ``metric`` (exact_match | vqa | multiple_choice) and ``prompt_suffix``; the sweep's
task entry overrides them. The task's digest (data, metadata, image and frame bytes) is part of every cell's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from ..errors import VTPruneError
from .metrics import LETTERS, normalize
from .schema import METRICS, TaskSpec

DATA_FILE = "data.jsonl"
META_FILE = "task.yaml"
KNOWN_FIELDS = {"id", "image", "images", "video", "question", "answer", "answers", "choices", "category", "tags"}
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclass
class Item:
    """One question: image paths and a video's frame paths (absolute; either may be empty), references, optional
    choices/category/tags, and carried extras."""

    id: str
    images: list[Path]
    question: str
    answers: list[str]
    choices: list[str] = field(default_factory=list)
    category: str | None = None
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    video: list[Path] = field(default_factory=list)

    def text(self, suffix: str | None) -> str:
        """The question as the model sees it: options listed as ``A. ...`` lines, then the suffix."""
        lines = [self.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices)]
        if suffix:
            lines.append(suffix)
        return "\n".join(lines)


@dataclass
class Task:
    """A loaded task; ``items`` already cut to the spec's ``limit``."""

    name: str
    root: Path
    metric: str
    prompt_suffix: str | None
    items: list[Item]
    digest: str

    def identity(self) -> dict[str, Any]:
        """What a result depends on (goes into the cell hash)."""
        return {"name": self.name, "digest": self.digest, "metric": self.metric, "prompt_suffix": self.prompt_suffix,
                "n": len(self.items)}


def load_task(spec: TaskSpec, root: Path) -> Task:
    """Read and check the folder ``root``; errors name the file, line and field."""
    data_file = root / DATA_FILE
    if not data_file.is_file():
        raise VTPruneError(f"task folder {root} has no {DATA_FILE}")
    meta = _read_meta(root / META_FILE)
    items = []
    digest = hashlib.sha256()
    for n, line in enumerate(data_file.read_text().splitlines(), 1):
        if line.strip():
            items.append(_parse_item(line, n, data_file))
    if not items:
        raise VTPruneError(f"{data_file}: no questions")
    default = "multiple_choice" if all(i.choices for i in items) else "exact_match"
    metric = spec.metric or meta.get("metric") or default
    if metric not in METRICS:
        raise VTPruneError(f"{root / META_FILE}: metric={metric!r}: expected one of {METRICS}")
    if metric == "multiple_choice":
        for n, item in enumerate(items, 1):
            _to_letter(item, data_file, n)
    suffix = spec.prompt_suffix if spec.prompt_suffix is not None else meta.get("prompt_suffix")
    if suffix is None and metric == "multiple_choice":
        suffix = MC_SUFFIX
    items = items[:spec.limit] if spec.limit else items
    for part in [data_file.read_bytes(), (root / META_FILE).read_bytes() if (root / META_FILE).is_file() else b""]:
        digest.update(hashlib.sha256(part).digest())
    for path in sorted({p for item in items for p in [*item.images, *item.video]}):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return Task(name=spec.name or meta.get("name") or root.name, root=root, metric=metric, prompt_suffix=suffix,
                items=items, digest=digest.hexdigest()[:16])


def write_task_folder(folder: Path, rows: Iterable[tuple[dict[str, Any], Mapping[str, Image.Image]]],
                      meta: dict[str, Any]) -> Path:
    """Write a generated task folder once: each row is (data.jsonl entry, the images it names: relative path ->
    image, saved as PNG); built aside and renamed into place, so a crash never leaves half a task. An existing
    folder is kept."""
    folder = Path(folder)
    if (folder / DATA_FILE).is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with open(tmp / DATA_FILE, "w") as f:
            for entry, files in rows:
                for relative, image in files.items():
                    (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                    image.save(tmp / relative, format="PNG")
                f.write(json.dumps(entry) + "\n")
        (tmp / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    except BaseException:  # a failing row (bad request, integrity error) leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    meta = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(meta) - {"name", "metric", "prompt_suffix", "description"}) if isinstance(meta, dict) else []
    if not isinstance(meta, dict) or unknown:
        raise VTPruneError(f"{path}: expected a mapping with name / metric / prompt_suffix / description"
                           + (f"; unknown key(s) {unknown}" if unknown else ""))
    return meta


def _strings(value: Any, where: str, key: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise VTPruneError(f"{where}: {key}: expected a string or a non-empty list of strings, got {value!r}")
    return values


def _parse_item(line: str, n: int, data_file: Path) -> Item:
    where = f"{data_file}:{n}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise VTPruneError(f"{where}: invalid JSON: {e}") from None
    if not isinstance(row, dict):
        raise VTPruneError(f"{where}: expected a JSON object")
    for alts in (("question",), ("answer", "answers")):
        if sum(a in row for a in alts) != 1:
            raise VTPruneError(f"{where}: needs exactly one of {' / '.join(alts)}")
    if ("image" in row and "images" in row) or not {"image", "images", "video"} & set(row):
        raise VTPruneError(f"{where}: needs image (a path) or images (a list), not both, and/or video (its frame "
                           "paths)")
    images = []
    if "image" in row or "images" in row:
        images = _files(_strings(row.get("image", row.get("images")), where, "image"), data_file, where, "image")
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        raise VTPruneError(f"{where}: category: expected a string, got {category!r}")
    return Item(id=str(row.get("id", n)), images=images, question=_strings(row["question"], where, "question")[0],
                answers=_strings(row.get("answer", row.get("answers")), where, "answer"),
                choices=_strings(row["choices"], where, "choices") if "choices" in row else [],
                category=category, tags=_strings(row["tags"], where, "tags") if row.get("tags") else [],
                extra={k: v for k, v in row.items() if k not in KNOWN_FIELDS},
                video=_video(row["video"], data_file, where) if "video" in row else [])


def _files(paths: list[str], data_file: Path, where: str, what: str) -> list[Path]:
    """``paths`` resolved against the task folder; missing files are named."""
    files = [(data_file.parent / p).resolve() for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise VTPruneError(f"{where}: {what} file(s) not found: {missing}")
    return files


def _video(value: Any, data_file: Path, where: str) -> list[Path]:
    """A video's frames: a non-empty list of paths to readable images of one size, in order."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise VTPruneError(f"{where}: video: expected a non-empty list of frame paths (relative to the task "
                           f"folder, in order), got {value!r}")
    frames = _files(value, data_file, where, "video frame")
    sizes = []
    for path in frames:
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except (OSError, ValueError):
            raise VTPruneError(f"{where}: video frame {path} is not a readable image") from None
    odd = [f"{p} is {w}x{h}" for p, (w, h) in zip(frames, sizes) if (w, h) != sizes[0]]
    if odd:
        raise VTPruneError(f"{where}: video frames must share one size: the first is {sizes[0][0]}x{sizes[0][1]}, "
                           f"but {', '.join(odd)}")
    return frames


def _to_letter(item: Item, data_file: Path, n: int) -> None:
    """Multiple choice: store the correct option as its letter."""
    if not item.choices:
        raise VTPruneError(f"{data_file}:{n}: metric multiple_choice needs choices")
    answer = item.answers[0].strip()
    letters = LETTERS[:len(item.choices)]
    if answer.upper() in letters and len(answer) == 1:
        item.answers = [answer.upper()]
        return
    norm = [normalize(c) for c in item.choices]
    if normalize(answer) not in norm:
        raise VTPruneError(f"{data_file}:{n}: answer {answer!r} is neither a letter {letters[0]}-{letters[-1]} nor "
                           f"one of the choices {item.choices}")
    item.answers = [letters[norm.index(normalize(answer))]]
