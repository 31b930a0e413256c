"""Accuracy of a testbed VLM on seeded question sets: overall, per category, and on small targets.

Each question is one batched forward pass through the model's own ``forward`` with the processor's outputs
(left padding), so a model patched by ``vtprune.apply`` is evaluated exactly as it would be used; the
prediction is the argmax of the last position's logits over the answer words (``ANSWER_WORDS``; for the video
testbed's items, ``VIDEO_ANSWER_WORDS``, with the video as ``pixel_values_videos``).

    python -m eval.testbed.evaluate --family llava --n 300
    python -m eval.testbed.evaluate --family qwen2_vl --video --checkpoint DIR --n 120
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vtprune.testbed.dataset import Item, make_eval_set
from vtprune.testbed.export import HELDOUT_SEED
from vtprune.testbed.model import ANSWER_WORDS, FAMILIES, IMAGE_SIZE, answer_token_ids, load_checkpoint, prompt, video_prompt
from vtprune.testbed.questions import CATEGORIES
from vtprune.testbed.scenes import render
from vtprune.testbed.video import VIDEO_ANSWER_WORDS, VIDEO_CATEGORIES, VIDEO_SIZE, VideoItem, make_video_eval_set

VALIDATION_SEED = 778  # the set that training checks progress on
TEST_SUBSET = 200  # the first items of the held-out set, re-scored by the tests
ALL_CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(CATEGORIES + VIDEO_CATEGORIES))  # reporting order


@dataclass
class EvalResult:
    """Per-item predictions and correctness, with the summary numbers derived from them."""

    items: list[Item] | list[VideoItem]
    predictions: list[str]

    @property
    def correct(self) -> list[bool]:
        return [p == it.question.answer for p, it in zip(self.predictions, self.items)]

    @property
    def accuracy(self) -> float:
        return _mean(self.correct)

    @property
    def per_category(self) -> dict[str, float]:
        """Accuracy per category, in ``ALL_CATEGORIES`` order (categories without items are left out)."""
        out = {}
        for c in ALL_CATEGORIES:
            hits = [ok for ok, it in zip(self.correct, self.items) if it.question.category == c]
            if hits:
                out[c] = _mean(hits)
        return out

    @property
    def small_target(self) -> float:
        """Accuracy on the items whose targets are all small objects (NaN when there are none)."""
        return _mean([ok for ok, it in zip(self.correct, self.items) if it.small_target])

    def summary(self) -> dict:
        """JSON-ready numbers (fractions in [0, 1])."""
        return {"n": len(self.items), "accuracy": self.accuracy, "per_category": self.per_category,
                "small_target": self.small_target, "n_small_target": sum(it.small_target for it in self.items)}


def _mean(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def family_of(model: torch.nn.Module) -> str:
    """The testbed family of a model: its config's ``model_type``, which the family names match."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a testbed family ({FAMILIES})")
    return model_type


def model_inputs(processor, family: str, items: list[Item] | list[VideoItem]) -> dict[str, torch.Tensor]:
    """The processor's batch for single-question prompts: images, or (video items) videos of VIDEO_SIZE frames."""
    if items and isinstance(items[0], VideoItem):
        return processor(text=[video_prompt(it.question.text) for it in items],
                         videos=[it.video.array(VIDEO_SIZE) for it in items], return_tensors="pt", padding=True)
    return processor(text=[prompt(family, it.question.text) for it in items],
                     images=[render(it.scene, IMAGE_SIZE[family]) for it in items], return_tensors="pt", padding=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, processor, items: list[Item] | list[VideoItem], batch_size: int = 50,
             family: str | None = None, progress: bool = False) -> EvalResult:
    """Answer every item with the model (eval mode, greedy over the answer words) and score it."""
    family = family or family_of(model)
    tok = processor.tokenizer
    video = bool(items) and isinstance(items[0], VideoItem)
    words = VIDEO_ANSWER_WORDS if video else ANSWER_WORDS
    answer_ids = torch.tensor(tok.convert_tokens_to_ids(list(words)) if video else answer_token_ids(tok))
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=f"eval {family}", disable=not progress):
        batch = items[start:start + batch_size]
        logits = model(**model_inputs(processor, family, batch)).logits[:, -1, answer_ids]
        predictions += [words[i] for i in logits.argmax(-1).tolist()]
    model.train(was_training)
    return EvalResult(list(items), predictions)


def format_table(rows: dict[str, EvalResult]) -> str:
    """A plain-text table of accuracies in percent: one row per result, one column per category."""
    cats = [c for c in ALL_CATEGORIES if any(c in r.per_category for r in rows.values())]
    head = ["model", "n", "all", *cats, "small"]
    lines = [head]
    for name, r in rows.items():
        pc = r.per_category
        lines.append([name, str(len(r.items)), f"{100 * r.accuracy:.1f}",
                      *(f"{100 * pc[c]:.1f}" if c in pc else "-" for c in cats), f"{100 * r.small_target:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def default_checkpoint(family: str, video: bool = False) -> Path:
    """Where ``train`` (``train_video``) saves, and the tests look for, the shipped checkpoint of ``family`` (of the
    video testbed, Qwen2-VL only)."""
    return Path(__file__).parent / "checkpoints" / (f"{family}_video" if video else family)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--checkpoint", type=Path, help="default: eval/testbed/checkpoints/<family>")
    parser.add_argument("--n", type=int, default=300, help="questions from the held-out set")
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED, help="eval-set seed")
    parser.add_argument("--video", action="store_true", help="the video testbed's questions (qwen2_vl only)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    path = args.checkpoint or default_checkpoint(args.family, args.video)
    if not (path / "config.json").exists():
        how = "train_video" if args.video else f"train --family {args.family}"
        parser.error(f"no checkpoint at {path}; train one with `python -m eval.testbed.{how}`")
    torch.set_num_threads(args.threads)
    model, processor = load_checkpoint(path)
    items = make_video_eval_set(args.seed, args.n) if args.video else make_eval_set(args.seed, args.n)
    result = evaluate(model, processor, items, args.batch_size, args.family, progress=True)
    print(format_table({args.family: result}))


if __name__ == "__main__":
    main()
