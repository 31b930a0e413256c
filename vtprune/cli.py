"""The ``vtprune`` command line. Subcommands: ``bench``, ``sweep``, ``leaderboard``, ``support-matrix`` (added
through :data:`COMMANDS`).

    vtprune bench --model bench-small --random-weights --pruners random,uniform --keep 0.5,0.25,0.11
    vtprune sweep configs/example_sweep.yaml
    vtprune leaderboard runs/example --out runs/example/leaderboard
    vtprune support-matrix --write README.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import VTPruneError


def _number_list(text: str) -> list[float | int]:
    """``"0.5,0.25,64"`` -> [0.5, 0.25, 64]: floats are fractions, ints are token counts."""
    out: list[float | int] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            out.append(float(item) if any(c in item for c in ".eE") else int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number") from None
    return out


def _image_size(text: str) -> tuple[int, int]:
    """``"672x672"`` or ``"672"`` -> (H, W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {text!r}: expected H x W, e.g. 672x672") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"image size {text!r}: expected H x W, e.g. 672x672")
    return (parts[0], parts[-1])


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """Arguments of ``vtprune bench``."""
    p = sub.add_parser("bench", help="time prefill of the unpruned model and pruning settings, with FLOPs",
                       description="Runs the unpruned model and every (pruner, keep) setting interleaved on one "
                                   "synthetic prompt (one image + random text ids) and prints FLOPs in both "
                                   "conventions next to measured prefill time.")
    p.add_argument("--model", required=True, help="a saved model directory, a config JSON, or a shipped config "
                                                  "name (configs/models: bench-small, llava-1.5-7b, ...)")
    p.add_argument("--random-weights", action="store_true", help="build a random-weight model from the config")
    p.add_argument("--pruners", default="random", help="comma-separated pruner names (default: random)")
    p.add_argument("--keep", type=_number_list, default=[0.5, 0.25, 0.11],
                   help="comma-separated keep values: fractions in (0, 1] or int token counts")
    p.add_argument("--site", choices=("pre_llm", "layer"), default=None,
                   help="where every pruner acts (default: each pruner's own site: layer for fastv and dart, "
                        "pre_llm for the others); a pruner that cannot act there is an error")
    p.add_argument("--layer", type=int, default=None,
                   help="K for the pruners acting at site layer (default: the pruner's own, 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    p.add_argument("--image-size", type=_image_size, default=None,
                   help="H x W of the synthetic image (LLaVA-NeXT, Qwen); LLaVA-1.5 always uses its own size")
    p.add_argument("--text-tokens", type=int, default=65, help="text tokens around the image (35 before it)")
    p.add_argument("--video-frames", type=int, default=0,
                   help="a synthetic video of this many frames (of --image-size) instead of the image, for the "
                        "families that prune videos (docs/video.md)")
    p.add_argument("--new-tokens", type=int, default=0,
                   help="also time generate() of this many tokens (TTFT, decode tokens/s, end to end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every measurement to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    """Run ``vtprune bench``."""
    from .benchmark import build_model, make_settings, run_bench, synthetic_inputs

    if args.threads < 1:
        raise VTPruneError(f"--threads must be >= 1, got {args.threads}")
    settings = make_settings([p.strip() for p in args.pruners.split(",") if p.strip()], args.keep, args.site,
                             args.layer)
    torch.set_num_threads(args.threads)
    model = build_model(args.model, random_weights=args.random_weights, dtype=args.dtype, device=args.device,
                        attn_implementation=args.attn, seed=args.seed)
    inputs = synthetic_inputs(model.config, image_size=args.image_size, text_tokens=args.text_tokens,
                              seed=args.seed, device=args.device, dtype=next(model.parameters()).dtype,
                              video_frames=args.video_frames)
    result = run_bench(model, inputs, settings, repeats=args.repeats, warmup=args.warmup,
                       new_tokens=args.new_tokens, progress=not args.no_progress)
    result.args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"}
    env = result.env
    print(f"model {args.model} ({'random weights' if args.random_weights else 'pretrained'}), "
          f"{inputs['input_ids'].shape[1]} prompt tokens | {env['device']} {env['dtype']}, "
          f"{env['torch_threads']} thread(s), attn={env['attn_implementation']} | "
          f"median of {args.repeats} after {args.warmup} warm-up, interleaved")
    print(result.table())
    print("FastV: LLM prefill only, 4nd²+2n²d+2ndm per layer (MACs). exact: 2 FLOPs per multiply-add, gated FFN, "
          "GQA, vision + projector + LM head (1 position) + pruner overhead; FLOPs-bound speedup uses it. "
          "ratio = speedup / FLOPs-bound; overhead = pruner selection time / prefill time; KV = cache after prefill; "
          "peak = memory added at the peak of one extra, untimed prefill.")
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8): shard I of N, 0 <= I < N (``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
    index, _, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"shard {text!r}: expected 0 <= I < N (shards count from 0), e.g. 0/4")
    return shard


def _folder(path: Path, what: str) -> None:
    """Fail before any work when ``path``, where a folder goes, is something else."""
    if path.exists() and not path.is_dir():
        raise VTPruneError(f"{what} {path} is a file; expected a folder (move the file or choose another path)")


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    """Arguments of ``vtprune sweep``."""
    p = sub.add_parser("sweep", help="run a YAML sweep: models x pruners x keep budgets x tasks (+ unpruned baselines)",
                       description="Validates the config, then runs every cell without a successful record in "
                                   "OUTPUT/results.jsonl (a rerun resumes). Sweeps sharing one output folder claim "
                                   "each cell with a lock, so none runs twice; --shard I/N splits the cells between "
                                   "N such processes or hosts. Under `accelerate launch` the processes share each "
                                   "cell's batches. Schema: docs/harness.md.")
    p.add_argument("config", type=Path, help="the sweep YAML")
    p.add_argument("--out", type=Path, default=None, help="output folder (overrides the config's output)")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="run shard I of N (0 <= I < N): every N-th cell from the I-th, plus the unpruned baselines "
                        "they need (run once, by whichever shard gets there first); N runs on one output folder "
                        "together make the whole sweep")
    p.add_argument("--check", action="store_true", help="validate the config and list the cells (of --shard); run "
                                                        "nothing")
    p.add_argument("--no-leaderboard", action="store_true",
                   help="do not write OUTPUT/leaderboard (leaderboard.md, .csv, plots) at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    """Run ``vtprune sweep``; exit status 1 when a cell failed (its error is in the results file)."""
    from .harness.runner import prepare, run_sweep, shard_cells
    from .harness.schema import load_config

    config = load_config(args.config, output=args.out)
    if args.check:
        from .harness.cells import expand
        from .harness.parallel import Parallel
        from .harness.store import check_output

        check_output(config.output_dir)  # --check writes the generated tasks and models there
        for cell in shard_cells(expand(config, prepare(config, Parallel())), args.shard):
            print(f"{cell.hash}  {cell.label}")
        return 0
    board = config.output_dir / "leaderboard"
    if not args.no_leaderboard:
        _folder(board, "leaderboard folder")
    run = run_sweep(config, progress=not args.no_progress, shard=args.shard)
    if run.par.is_main:
        others = f", {run.elsewhere} run by other processes" if run.elsewhere else ""
        print(f"[vtprune sweep] {run.counts['ok']} cell(s) ok, {run.counts['error']} failed{others} -> "
              f"{run.store.path}", file=sys.stderr)
        if not args.no_leaderboard and run.store.records():
            _sweep_leaderboard(run.store.path, board)
    return 1 if run.counts["error"] else 0


def _sweep_leaderboard(results: Path, board: Path) -> None:
    """Write the sweep's leaderboard from every record in the results file, one process at a time (the last sweep
    on the folder to finish writes the complete one)."""
    from .harness.leaderboard import write_leaderboard
    from .harness.store import Claim

    claim = Claim(results.parent, "leaderboard")
    claim.acquire(wait=True)
    try:
        paths = write_leaderboard(results, board)
    finally:
        claim.release()
    print(f"[vtprune sweep] leaderboard and plots -> {paths[0].parent}", file=sys.stderr)


def _add_leaderboard(sub: argparse._SubParsersAction) -> None:
    """Arguments of ``vtprune leaderboard``."""
    p = sub.add_parser("leaderboard", help="leaderboard.md/.csv and plots from a results file",
                       description="Ranks methods by accuracy retention at each keep budget, per model and task, "
                                   "with FLOPs, measured prefill speedup and overhead; writes PNG plots. Damaged "
                                   "lines of the results file are named (file:line) and skipped; a file without one "
                                   "valid record is an error (exit status 2).")
    p.add_argument("results", type=Path, help="a results.jsonl, or a sweep output folder holding one")
    p.add_argument("--out", type=Path, required=True, help="folder for leaderboard.md, leaderboard.csv and PNGs")
    p.add_argument("--flops", choices=("fastv", "prefill"), default="fastv",
                   help="FLOPs on the plots' x axis: FastV convention (LLM prefill) or exact prefill (default fastv)")
    p.add_argument("--aggregate-seeds", action="store_true",
                   help="merge the rows that differ only in seed (the sweep's or options.seed) into one: mean ± "
                        "sample std with the number of seeds n (default: every cell is its own row)")
    p.set_defaults(run=_leaderboard)


def _leaderboard(args: argparse.Namespace) -> int:
    """Run ``vtprune leaderboard``."""
    from .harness.leaderboard import write_leaderboard

    _folder(args.out, "--out")
    for path in write_leaderboard(args.results, args.out, flops=args.flops, aggregate=args.aggregate_seeds):
        print(f"wrote {path}")
    return 0


#: subcommand name -> function adding its parser (it sets ``run``)
def _run_support_matrix(args: argparse.Namespace) -> int:
    from .support import replace_block, support_markdown

    block = support_markdown()
    if args.write is None and args.check is None:
        print(block)
        return 0
    path = Path(args.write or args.check)
    if not path.is_file():
        raise VTPruneError(f"{path}: no such file")
    text = path.read_text()
    new = replace_block(text, block)
    if args.check is not None:
        if new != text:
            print(f"{path}: the support matrix is out of date; run `vtprune support-matrix --write {path}`",
                  file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


def _add_support_matrix(sub: argparse._SubParsersAction) -> None:
    """Arguments of ``vtprune support-matrix``."""
    p = sub.add_parser("support-matrix", help="the family x site x attention x fallback matrix, from the registries")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="replace the generated block in FILE (e.g. README.md)")
    group.add_argument("--check", metavar="FILE", help="exit 1 if FILE's generated block is out of date")
    p.set_defaults(run=_run_support_matrix)


COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "bench": _add_bench, "sweep": _add_sweep, "leaderboard": _add_leaderboard,
    "support-matrix": _add_support_matrix}


def build_parser() -> argparse.ArgumentParser:
    """The ``vtprune`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="vtprune", description="Training-free visual-token pruning for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn bad input into a one-line error with exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VTPruneError as e:
        print(f"vtprune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
