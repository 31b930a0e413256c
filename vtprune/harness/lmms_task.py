"""The functions an exported lmms-eval task calls (its ``utils.py`` re-exports them), so that lmms-eval scores a
local task with exactly the metric the local backend uses.

An exported row holds ``images`` (absolute paths), ``prompt`` (the question text with options and suffix, see
:meth:`.tasks.Item.text`), ``answers``, ``choices`` and ``metric``; rows keep the task's order, so lmms-eval's
``doc_id`` is the question's index (categories, tags and extras are joined back from the task by the backend).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from .metrics import score


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["prompt"]


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["answers"][0]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """One question's score under the task's metric."""
    prediction = results[0] if results else ""
    return {"score": score(doc["metric"], prediction.strip(), doc["answers"], doc["choices"] or [])}
