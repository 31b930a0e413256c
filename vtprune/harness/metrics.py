"""Answer normalisation and the three local metrics: exact match, VQA-style accuracy, multiple choice.

All scores are in [0, 1] per question; a task's score is their mean. ``normalize`` follows the spirit of the VQA
evaluation (lower case, punctuation out, number words to digits, articles dropped) so that "Two." and "2" match.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
LETTERS = string.ascii_uppercase


def normalize(text: str) -> str:
    """First line, lower case, punctuation to spaces (decimal points kept), number words to digits, no articles."""
    lines = text.strip().splitlines()
    text = _DECIMAL.sub("\0", lines[0].lower() if lines else "")
    words = _PUNCT.sub(" ", text).replace("\0", ".").split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the normalised prediction equals any normalised reference answer."""
    pred = normalize(prediction)
    return float(any(pred == normalize(a) for a in answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA-style accuracy ``min(1, matches / min(3, #answers))``: with VQAv2's 10 human answers, 3 agreeing annotators
    give full credit; with a single reference answer it is exact match on normalised text."""
    pred = normalize(prediction)
    matches = sum(pred == normalize(a) for a in answers)
    return min(1.0, matches / min(3, len(answers)))


def choice_letter(prediction: str, choices: Sequence[str]) -> str | None:
    """The option a free-form answer picks: a leading letter ("B", "(b)", "B. red"), else the one choice whose text
    it equals or, failing that, the only choice text it contains; ``None`` if ambiguous or absent."""
    letters = LETTERS[:len(choices)]
    head = re.match(r"^\W*([A-Za-z])(?:\W|$)", prediction.strip())
    if head and head.group(1).upper() in letters and (len(prediction.strip()) <= 3 or head.group(0)[-1:] in ".):"):
        return head.group(1).upper()
    pred = normalize(prediction)
    norm = [normalize(c) for c in choices]
    if pred in norm:
        return letters[norm.index(pred)]
    found = [letters[i] for i, c in enumerate(norm) if c and re.search(rf"\b{re.escape(c)}\b", pred)]
    return found[0] if len(found) == 1 else None


def multiple_choice(prediction: str, choices: Sequence[str], answer_letter: str) -> float:
    """1 if the prediction picks the correct option (see :func:`choice_letter`)."""
    return float(choice_letter(prediction, choices) == answer_letter)


def score(metric: str, prediction: str, answers: Sequence[str], choices: Sequence[str] = ()) -> float:
    """Dispatch on the metric name; for ``multiple_choice`` ``answers[0]`` is the correct letter."""
    if metric == "exact_match":
        return exact_match(prediction, answers)
    if metric == "vqa":
        return vqa_accuracy(prediction, answers)
    if metric == "multiple_choice":
        return multiple_choice(prediction, choices, answers[0])
    raise ValueError(f"unknown metric {metric!r}")


def _mean_block(values: list[float]) -> dict[str, Any]:
    return {"score": sum(values) / len(values), "n": len(values)}


def aggregate(scores: Sequence[float], categories: Sequence[str | None], tags: Sequence[Sequence[str]]
              ) -> dict[str, Any]:
    """Task score, plus per category and per tag (``{"score", "n"}`` each); questions without a category are only
    in the total."""
    by_cat: dict[str, list[float]] = {}
    by_tag: dict[str, list[float]] = {}
    for s, cat, item_tags in zip(scores, categories, tags):
        if cat is not None:
            by_cat.setdefault(cat, []).append(s)
        for tag in item_tags:
            by_tag.setdefault(tag, []).append(s)
    return {**_mean_block(list(scores)),
            "per_category": {c: _mean_block(v) for c, v in sorted(by_cat.items())},
            "per_tag": {t: _mean_block(v) for t, v in sorted(by_tag.items())}}
