"""Run a sweep: prepare assets, expand the grid, skip finished cells, evaluate the rest, append one record per cell.

A failing cell is recorded with its error and the sweep goes on; a killed sweep loses nothing that was appended
(see :mod:`.store`) and a rerun skips every cell with a successful record. Under ``accelerate launch`` each process
evaluates its share of every cell's batches and rank 0 gathers, scores and writes.

Several sweeps may share one output folder (a second terminal, the shards of ``--shard I/N``, hosts on a shared
filesystem): each cell is claimed with a lock before it runs (:class:`.store.Claim`), so no cell runs twice. A cell
another process runs, or has recorded since this sweep started, is skipped; an unpruned baseline that another
process runs is waited for, because the cells after it need its record for their ratios.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from ..errors import VTPruneError
from ..testbed.export import write_task as write_testbed_task
from . import models
from .cells import Cell, baseline_of, expand, stable_hash
from .lmms_eval_backend import run_lmms
from .local import LocalEvaluator, ShardResult, batches
from .metrics import aggregate, score
from .parallel import Parallel
from .probe import GenerateMeasurement, summarize
from .records import environment, error_record, ok_record
from .schema import ModelSpec, SweepConfig
from .store import check_output, successes, write_predictions
from .sweep_run import SweepRun
from .synthetic import generated_task_dir, write_shapes_task
from .tasks import Task, load_task


def failure(exc: BaseException) -> dict[str, str]:
    """A short message plus the tail of the traceback."""
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": "".join(traceback.format_exception(exc))[-4000:]}


def prepare(config: SweepConfig, par: Parallel) -> list[Task]:
    """Write generated tasks and save tiny models (rank 0), then load and check every task on every rank, before
    any cell runs."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-shard bars would break the sweep's progress bar
    roots = [Path(t.path) if t.path else generated_task_dir(t, config.output_dir, config.seed) for t in config.tasks]
    if par.is_main:
        for spec, root in zip(config.tasks, roots):
            if spec.synthetic:
                write_shapes_task(root, spec.size, seed=config.seed)
            elif spec.testbed:
                write_testbed_task(root, spec.testbed, spec.size)
        for model in config.models:
            if model.tiny:
                models.materialize_tiny(model, config.output_dir, config.seed)
    par.barrier()
    tasks = [load_task(spec, root) for spec, root in zip(config.tasks, roots)]
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VTPruneError(f"task names must be unique; set name: on the task entries named {dup}")
    return tasks


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """The cells shard ``(I, N)`` runs, in run order: every N-th cell from the I-th, plus the unpruned baselines
    of their model and task (claimed like any cell, so each runs once, by whichever shard gets there first)."""
    if shard is None:
        return cells
    index, count = shard
    own = cells[index::count]
    needed = {c.hash for c in own} | {baseline_of(c, cells).hash for c in own}
    return [c for c in cells if c.hash in needed]


def run_sweep(config: SweepConfig, progress: bool = True, shard: tuple[int, int] | None = None) -> SweepRun:
    """Run every unfinished cell of ``config`` (of shard ``(I, N)`` only, see :func:`shard_cells`); returns the
    run state (``counts`` of ok / error records, ``elsewhere``: cells left to other processes)."""
    torch.set_num_threads(config.measure.threads)
    par = Parallel()
    if par.world > 1 and config.backend == "lmms_eval":
        raise VTPruneError("the lmms_eval backend parallelises itself: set lmms_eval.num_processes instead of "
                           "launching the sweep with several processes")
    store = check_output(config.output_dir)
    tasks = prepare(config, par)
    cells = expand(config, tasks)
    mine = shard_cells(cells, shard)
    records = store.records() if par.is_main else []  # one snapshot: later records are looked at on claiming
    finished = par.broadcast(successes(records) if par.is_main else None)
    pending = [c for c in mine if c.hash not in finished]
    config_hash = stable_hash(config.model_dump(exclude={"output"}))
    context = {"sweep": config.name, "config_hash": config_hash, "seed": config.seed, "env": environment(par.world)}
    run = SweepRun(config, cells, store, dict(finished), context, par, seen=len(records))
    if par.is_main:
        _write_snapshot(config, config_hash)
        if store.damaged:
            print(f"[vtprune sweep] warning: {store.damage_report()}; their cells run again unless another line "
                  "records them", file=sys.stderr)
        part = "" if shard is None else f", shard {shard[0]}/{shard[1]}: {len(mine)} of them"
        print(f"[vtprune sweep] {config.name}: {len(cells)} cells{part} ({len(mine) - len(pending)} finished earlier, "
              f"{len(pending)} to run) -> {store.path}", file=sys.stderr)
    questions = sum(_questions(c, par) for c in pending)
    with tqdm(total=questions, desc="sweep", unit="q", disable=not (progress and par.is_main), dynamic_ncols=True,
              file=sys.stderr) as run.bar:
        if config.backend == "local":
            _run_local(run, pending)
        else:
            run_lmms(run, pending)
    par.barrier()
    return run


def _write_snapshot(config: SweepConfig, config_hash: str) -> None:
    """The resolved config next to the results, for reference."""
    path = config.output_dir / "sweep.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".sweep.yaml.{os.getpid()}")
    tmp.write_text(yaml.safe_dump({"config_hash": config_hash, **config.model_dump()}, sort_keys=False))
    tmp.replace(path)


def _my_batches(cell: Cell, par: Parallel) -> list[list[int]]:
    return batches(len(cell.task.items), cell.model.batch_size)[par.rank::par.world]


def _questions(cell: Cell, par: Parallel) -> int:
    """This process's share of the cell's questions (its progress-bar steps)."""
    return sum(map(len, _my_batches(cell, par)))


def _load(run: SweepRun, spec: ModelSpec) -> tuple[LocalEvaluator | None, dict[str, str] | None]:
    """(the model's evaluator, ``None``) or (``None``, the first load failure of any process)."""
    config, par = run.config, run.par
    try:
        model, processor = models.load(spec, run.out, models.device_for(spec, par.local_rank), config.seed)
        evaluator, problem = LocalEvaluator(model, processor, spec, config.generation), None
    except Exception as e:  # a model that fails to load fails its cells, not the sweep
        evaluator, problem = None, failure(e)
    problems = [p for p in par.gather(problem) if p]
    return (None, problems[0]) if problems else (evaluator, None)


def _run_local(run: SweepRun, pending: list[Cell]) -> None:
    """Run the pending cells model by model, in order, loading a model when this process claims its first cell."""
    for spec in run.config.models:
        loaded = None
        for cell in (c for c in pending if c.model is spec):
            with run.claim(cell) as claimed:
                if not claimed:
                    run.bar.update(_questions(cell, run.par))
                    continue
                started = time.time()
                loaded = loaded or _load(run, spec)
                evaluator, problem = loaded
                if evaluator is None:
                    run.emit(error_record(cell, run.context, started, **problem))
                    run.bar.update(_questions(cell, run.par))
                else:
                    _run_local_cell(run, evaluator, cell)
        loaded = evaluator = None  # free the model before loading the next
        gc.collect()


def _run_local_cell(run: SweepRun, evaluator: LocalEvaluator, cell: Cell) -> None:
    config, par = run.config, run.par
    run.bar.set_postfix_str(cell.label, refresh=False)
    my_batches = _my_batches(cell, par)
    expected = _questions(cell, par)
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        run.bar.update(n)

    started = time.time()
    try:
        torch.manual_seed(config.seed)
        shard = evaluator.run(cell.task, my_batches, cell.setting.pruner_config(config.seed), config.measure, advance)
        payload: tuple[dict[str, Any] | None, dict[str, str] | None] = (asdict(shard), None)
    except Exception as e:
        payload = (None, failure(e))
    run.bar.update(expected - done[0])
    parts = par.gather(payload)
    if par.is_main:
        run.emit(_local_record(run, cell, parts, started))


def _local_record(run: SweepRun, cell: Cell, parts: list[tuple[dict | None, dict | None]], started: float
                  ) -> dict[str, Any]:
    """Score the gathered predictions and build the cell's record (or its error record)."""
    problems = [p for _, p in parts if p]
    if problems:
        return error_record(cell, run.context, started, **problems[0])
    try:
        shards = [ShardResult(**s) for s, _ in parts]
        predictions = {i: t for s in shards for i, t in s.predictions.items()}
        summary = summarize([GenerateMeasurement(**m) for s in shards for m in s.measurements])
        metrics, rows = score_task(cell.task, predictions)
        relative = write_predictions(run.out, cell.hash, rows)
        base_hash, base = run.baseline_for(cell)
        memory = {"peak_bytes": shards[0].peak_bytes, "kv_bytes": shards[0].kv_bytes}
        return ok_record(cell, run.context, started, metrics, summary, memory, base, base_hash,
                         extra={"predictions": relative})
    except Exception as e:
        return error_record(cell, run.context, started, **failure(e))


def score_task(task: Task, predictions: dict[int, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics with per-category/per-tag breakdown, one row per question for the predictions file)."""
    rows, scores = [], []
    for i, item in enumerate(task.items):
        value = score(task.metric, predictions[i], item.answers, item.choices)
        scores.append(value)
        rows.append({"index": i, "id": item.id, "question": item.question, "prediction": predictions[i],
                     "answers": item.answers, "score": value, "category": item.category, "tags": item.tags,
                     **item.extra})
    metrics = {"metric": task.metric, **aggregate(scores, [i.category for i in task.items],
                                                  [i.tags for i in task.items])}
    return metrics, rows
