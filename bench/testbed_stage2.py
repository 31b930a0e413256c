"""Stage 2 of a testbed training recipe: which counting answers its turns train on, and where a step's time goes.

Counting answers: the counting turns (``training_data.pick_questions``) of the first ``--images`` stage-2 images
(``training_data.stage2_item``) under the family's recipe, as shares of all counting turns, beside the same count
with ``high_counts`` = 0 (what the held-out set asks: each of zero..five equally). Step time: one batch of the
recipe on a fresh full-size model with the tower frozen as in stage 2; data building (``stage2_batch``), forward
and backward, each the median of ``--repeats`` timed steps after one warm-up; no optimiser step, so the weights
stay put and every repeat times the same work. ``--profile`` adds torch.profiler's self-CPU table of one more
step (which kernels the time goes to).

    python bench/testbed_stage2.py --family qwen2_vl --images 1500 --repeats 5 [--profile]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import replace

import torch

from eval.testbed.train import RECIPES, Stage, frozen_tower, stage2_inputs
from eval.testbed.training_data import pick_questions, stage2_batch, stage2_item
from vtprune.measure import median
from vtprune.testbed.model import build_model
from vtprune.testbed.questions import ANSWERS


def count_answer_shares(stage: Stage, seed: int, images: int) -> dict[str, float]:
    """Share of each counting answer among the counting turns of the first ``images`` stage-2 images."""
    counts: Counter[str] = Counter()
    for k in range(images):
        item = stage2_item(seed, k, stage.high_counts)
        counts.update(q.answer for q in pick_questions(item.scene, item.question, seed, k, stage.extra_counts)
                      if q.category == "counting")
    total = sum(counts.values())
    return {a: round(counts[a] / total, 4) for a in ANSWERS["counting"]}


def step_seconds(family: str, stage: Stage, seed: int, repeats: int, profile: bool = False) -> dict[str, float]:
    """Median seconds of data building, forward and backward for one stage-2 batch; with ``profile``, also
    print the self-CPU profile of one more forward + backward."""
    model, processor = build_model(family, seed)
    frozen_tower(model, family)
    model.train()
    times: dict[str, list[float]] = {"data": [], "forward": [], "backward": []}
    for step in range(repeats + 1):
        t0 = time.perf_counter()
        batch = stage2_batch(processor, family, seed, step, stage.batch, stage.extra_counts, stage.high_counts)
        t1 = time.perf_counter()
        loss = model(**stage2_inputs(model, family, batch), use_cache=False).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if step:  # step 0 is the warm-up
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(seconds)
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(**stage2_inputs(model, family, batch), use_cache=False).loss.backward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return {key: round(median(values), 3) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(RECIPES), default="qwen2_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also print the self-CPU profile of one step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stage = RECIPES[args.family].stage2
    result = {"family": args.family, "images": args.images, "threads": args.threads,
              "counting_answers": count_answer_shares(stage, args.seed, args.images),
              "counting_answers_without_high_counts": count_answer_shares(replace(stage, high_counts=0.0),
                                                                          args.seed, args.images),
              "step_seconds": step_seconds(args.family, stage, args.seed, args.repeats, args.profile)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
