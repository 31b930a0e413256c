"""GPU report (issue 20, item 3): real-size random-weight VLMs in bf16 on one CUDA GPU, pruned and unpruned.

Called by ``bench/gpu.sh``, which installs what it needs first. Per model (random weights from
``configs/models/*.json``, no hub), per attention kernel (SDPA; FlashAttention-2 when ``flash_attn`` imports):

1. **keep-all exactness**: every method with an int budget above the visual token count (its ``select`` runs and
   keeps everything), and once ``keep=1.0`` (no selection): logits at every position against the unhooked model,
   max |Δ| and bit-identity (``torch.equal``).
2. **pruned == short input**: per method and keep, the pruned logits at every position against the *oracle* of
   ``bench/engine_overhead.py`` (the unhooked model run by hand on the kept rows at their original positions, from
   the LM input on or from decoder layer K on): max |Δ|, the largest |logit| for scale, bit-identity.
3. **timing**: ``vtprune.benchmark.run_bench`` (unpruned + every method × keep, interleaved passes, medians after
   warm-up): prefill (``use_cache=True``, last logits), time to first token and decode tokens/s of a greedy
   ``generate``, selection time, peak memory (``max_memory_allocated`` in an extra untimed pass), KV-cache bytes,
   FLOPs; speedup = unpruned median ÷ setting median, same process, same pass order.
4. **oracle ratio**: ``bench/engine_overhead.py``'s ``time_cells`` (pruned and oracle prefills back to back,
   alternating order): ratio = median oracle time ÷ median pruned time (the pruned side includes the method's
   selection; the oracle is given the selection for free).
5. **greedy kernel** (once per model, before its kernels): the greedy loops of DivPrune (both modes) and the k-center,
   MMR and SADS scores on random features of the model's visual token count and hidden size, in its dtype, at
   k = 64 / 192 / 320 / 640 below that count: picks of the one-launch Triton kernel (``vtprune.kernels``) against
   the torch loop, and DivPrune's loop timed both ways; the report names a fallback (``greedy_kernel``).
6. **received attention** (once, before the models): ``ops.attention_transpose_apply``, the encoder-attention score
   of VisionZip / VisPruner / VTC-CLS / Zero-TPrune on encoders without [CLS], at Qwen2.5-VL's last full-attention
   block (16 heads, d = 80) for its 576- and 2880-token views (2304 / 11,520 patches), bf16 q/k as the model gives
   them: the default blocks (all heads per block on a GPU) and one head per block (the CPU's choice), timed
   (synchronised medians) and compared with each other.

A global time budget (``--budget-s``) is split evenly over the (model, kernel) blocks still to run, builds
reserved; a block that cannot fit is skipped with a note, a block that runs short of time stops its repeats
early (``passes`` records how many ran), and the report is rewritten after every block, so a run killed from
outside still leaves one. ``--dry-run``: the tiny models of ``vtprune.testing.tiny_vlm`` on the CPU, SDPA and
eager as the two kernels, the same code path and report format, in a minute or two (``tests/test_bench_gpu.py``).

    python bench/gpu_report.py --budget-s 420 --out bench/results/gpu-DATE     # on the GPU machine (gpu.sh)
    python bench/gpu_report.py --dry-run --out /tmp/gpu-dry                     # plumbing, CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: its sibling scripts
import engine_overhead as eo
import greedy_stress

import vtprune
from vtprune import ops
from vtprune.benchmark import Setting, build_model, resolve_model, run_bench, synthetic_inputs
from vtprune.errors import VTPruneError
from vtprune.kernels import status as kernel_status
from vtprune.kernels import unsupported as kernel_unsupported
from vtprune.measure import Timer, _cpu_name, median
from vtprune.methods.divprune import nearest_neighbour_seed
from vtprune.methods.kcenter import farthest_on_average_seed
from vtprune.methods.mmr import MMRConfig
from vtprune.models import family_class
from vtprune.registry import make_config, pruner_class

METHODS = ("random", "dart", "fastv", "divprune", "zoo")
LAYER = 2  # K of the in-LLM methods (DART, FastV): their default
KERNELS = ("sdpa", "flash_attention_2")
DRY_KERNELS = ("sdpa", "eager")  # CPU stand-in for a second kernel: exercises the kernel loop
KEEP_ALL = 1_000_000  # an int budget above any image's token count: select runs and keeps everything
#: DART's reported prefill speedup at 320 of 2880 tokens on LLaVA-NeXT-7B, to compare with
DART_REPORTED = {"model": "llava-next-7b", "keep": 320, "speedup": 2.99}
#: picks of the greedy check (those below the model's visual token count; the dry run: its scaled keeps)
GREEDY_KEEPS = (64, 192, 320, 640)
#: the received-attention check: Qwen2.5-VL's vision heads and head size, patches of its 576- and 2880-token views
#: (the dry run: 64 and 256)
ATTENTION_HEADS, ATTENTION_DIM = 16, 80
ATTENTION_PATCHES, DRY_ATTENTION_PATCHES = (2304, 11520), (64, 256)


@dataclass(frozen=True)
class ModelSpec:
    """One model of the report: a shipped config, its family, the image (None: the family's default size or,
    for Qwen, 24 × 24 merged patches = 576 tokens), the keeps (tokens per image) and the nominal token count
    the keeps refer to (the dry run scales them to its tiny models)."""

    name: str
    family: str
    image: tuple[int, int] | None
    keeps: tuple[int, ...]
    nominal: int


MODELS = (
    ModelSpec("llava-1.5-7b", "llava", None, (64, 128, 192), 576),
    ModelSpec("llava-next-7b", "llava_next", (672, 672), (320, 640), 2880),  # 5 views × 576 + 48 newlines
    ModelSpec("qwen2.5-vl-7b", "qwen2_5_vl", None, (64, 128, 192), 576),
    ModelSpec("qwen3-vl-8b", "qwen3_vl", None, (64, 128, 192), 576),  # only once config and family exist
)


# ---- what can run here ---------------------------------------------------------------------------------
def available(spec: ModelSpec, dry_run: bool) -> str | None:
    """None if ``spec`` can run, else why not (its config file or its family is missing)."""
    try:
        family_class(spec.family)
    except VTPruneError:
        return f"family {spec.family!r} is not registered in vtprune.models"
    if not dry_run:
        try:
            resolve_model(spec.name)
        except VTPruneError:
            return f"configs/models/{spec.name}.json does not exist"
    return None


def kernel_missing(kernel: str, device: str) -> str | None:
    """None if attention ``kernel`` can run on ``device``, else why not."""
    if kernel != "flash_attention_2":
        return None
    if not str(device).startswith("cuda"):
        return "FlashAttention-2 needs a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed (see bench/gpu.sh: only a prebuilt wheel is tried)"
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # a wheel built for another torch fails here (undefined symbols)
        return f"flash_attn does not import: {type(e).__name__}: {e}"
    return None


def environment_record(device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Versions, threads, kernels and the machine: what every timing depends on."""
    import transformers

    env: dict[str, Any] = {
        "device": device, "dtype": str(dtype).replace("torch.", ""), "python": platform.python_version(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(), "flash_attn": None,
    } | eo._provenance()
    if importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn
            env["flash_attn"] = flash_attn.__version__
        except Exception as e:
            env["flash_attn"] = f"import fails: {type(e).__name__}"
    if str(device).startswith("cuda"):
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        env |= {"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
                "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1), "cudnn": torch.backends.cudnn.version(),
                "sdpa_backends_enabled": {
                    "flash": torch.backends.cuda.flash_sdp_enabled(),
                    "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                    "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=False)
            env["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


# ---- models and inputs -----------------------------------------------------------------------------------
def build(spec: ModelSpec, dry_run: bool, device: str, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
    """The model (real-size random weights, or the family's tiny test model in the dry run) in ``dtype`` on
    ``device`` with SDPA, and its synthetic prompt."""
    if dry_run:
        from vtprune.testing import tiny_vlm

        model = tiny_vlm(spec.family, attn_implementation="sdpa").model.to(device=device, dtype=dtype)
    else:
        model = build_model(spec.name, random_weights=True, dtype=str(dtype).replace("torch.", ""), device=device,
                            attn_implementation="sdpa")
    model.requires_grad_(False)
    image = image_size(spec, model.config, dry_run)
    inputs = synthetic_inputs(model.config, image_size=image, text_tokens=20 if dry_run else 65, device=device,
                              dtype=dtype)
    return model, inputs


def image_size(spec: ModelSpec, config: Any, dry_run: bool) -> tuple[int, int] | None:
    """(H, W) of the synthetic image: Qwen-style towers (patches merged) 24 × 24 merged patches (4 × 2 in the dry
    run); a single fixed-size view (LLaVA-1.5) its size; the spec's size otherwise (the dry run: engine_overhead's
    tiny image)."""
    vc = config.vision_config
    merge = getattr(vc, "spatial_merge_size", None)
    if merge:
        unit = vc.patch_size * merge
        return (4 * unit, 2 * unit) if dry_run else (24 * unit, 24 * unit)
    if getattr(config, "image_grid_pinpoints", None) is None:  # one fixed-size view (LLaVA-1.5): what it encodes
        return (vc.image_size, vc.image_size)
    return eo.TINY_IMAGE if dry_run else spec.image


def keeps_for(spec: ModelSpec, visual: int, dry_run: bool) -> list[int]:
    """The spec's keeps; in the dry run scaled from its nominal token count to the tiny model's."""
    if not dry_run:
        return list(spec.keeps)
    return sorted({max(1, min(visual - 1, round(k * visual / spec.nominal))) for k in spec.keeps})


def method_options(name: str, keep: int) -> dict[str, Any]:
    """``make_config`` options of one method at one keep: its own default site (K = LAYER in the LLM)."""
    site = pruner_class(name).config_class.site
    return {"keep": keep, "site": site} | ({"layer": LAYER} if site == "layer" else {})


# ---- checks ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def all_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The prefill's logits at every position (with a KV cache, as generation runs it)."""
    return eo.pruned_logits(model, inputs, last_only=False)


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    """max |Δ| (in float32), the largest |logit| of ``want`` for scale, and bit-identity."""
    return {"max_abs_diff": float((got.float() - want.float()).abs().max()),
            "max_abs_logit": float(want.float().abs().max()), "bit_identical": bool(torch.equal(got, want))}


def keep_all(model: nn.Module, inputs: dict[str, Any], reference: torch.Tensor, methods: Sequence[str]
             ) -> list[dict[str, Any]]:
    """Each method keeping every token (``select`` runs), and ``keep=1.0`` once (no selection), against the
    unhooked logits."""
    rows = []
    for name, keep in [(m, KEEP_ALL) for m in methods] + [(methods[0], 1.0)]:
        row: dict[str, Any] = {"method": name, "keep": keep}
        try:
            options = method_options(name, KEEP_ALL) | {"keep": keep}
            with vtprune.apply(model, name, **options):
                row |= compare(all_logits(model, inputs), reference)
        except Exception as e:  # recorded, not fatal: the report says which method fails on this kernel
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def oracle_check(model: nn.Module, inputs: dict[str, Any], cell: eo.Cell) -> dict[str, Any]:
    """The pruned logits against the short-input oracle's (not asserted: bf16 GPU kernels may differ); and a short
    pruned ``generate``, so that a method failing on the decode path fails here, not in the timing."""
    row: dict[str, Any] = {"method": cell.pruner, "keep": cell.keep, "site": cell.site,
                           "layer": cell.layer if cell.site == "layer" else None}
    logits = eo.kept_rows(model, inputs, cell)
    with vtprune.apply(model, cell.pruner, **cell.options):  # the decode path too, before it is timed
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    row |= {"tokens": cell.tokens, "kept": cell.kept, "visual_before": cell.visual[0],
            "visual_after": cell.visual[1]}
    try:
        with torch.inference_mode():
            expected = eo.oracle(model, inputs, cell.keep_index, cell.site, cell.layer, last_only=False)
        row |= compare(logits, expected)
    except Exception as e:  # e.g. a family whose LM takes inputs the oracle does not rebuild
        row["oracle_error"] = f"{type(e).__name__}: {e}"
    return row


# ---- the greedy selection kernel ------------------------------------------------------------------------
def greedy_loops(features: torch.Tensor, generator: torch.Generator
                 ) -> list[tuple[str, torch.Tensor, torch.Tensor, ops.StepScore]]:
    """(name, similarity matrix, first pick, step score) of the methods' greedy loops on ``features`` [V, D] (the
    model's dtype, as the methods see them): DivPrune in both modes, and the k-center, MMR (norm importance, its
    default λ) and SADS (random sensitivity) scores over a precomputed float32 matrix."""
    unit = ops.unit_rows(features)
    sim = unit @ unit.T
    own = ops.unit_rows(features, features.dtype)
    sim_own = own @ own.T
    imp = ops.min_max(features.float().norm(dim=-1), eps=1e-6)
    sens = ops.min_max(torch.rand(features.shape[0], generator=generator).to(features.device), eps=1e-8,
                       constant=1.0)
    lam = MMRConfig.lam
    return [("divprune", sim, nearest_neighbour_seed(sim), ops.Farthest()),
            (f"divprune reference ({str(features.dtype).removeprefix('torch.')})", sim_own,
             nearest_neighbour_seed(sim_own, second_smallest=True), ops.Farthest()),
            ("k-center score", sim, farthest_on_average_seed(unit), ops.Farthest()),
            ("mmr score", sim, imp.argmax(), ops.Marginal(lam * imp, 1 - lam)),
            ("sads score", sim, sens.argmax(), ops.Farthest(sens))]


def greedy_check(tokens: int, dim: int, keeps: Sequence[int], device: str, dtype: torch.dtype, repeats: int,
                 warmup: int) -> dict[str, Any]:
    """Every loop of :func:`greedy_loops` on random features [tokens, dim] at every k of ``keeps``: the picks of
    ``ops.greedy`` over the matrix (one kernel launch where it applies) against the torch loop (a plain column
    function, which never dispatches), and for DivPrune the median time of both (``warmup`` + ``repeats`` runs,
    synchronised). ``kernel_ran`` says whether the kernel ran or the torch loop stood in (``why_not``)."""
    start = time.monotonic()
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(tokens, dim, generator=gen).to(device=device, dtype=dtype)
    out: dict[str, Any] = {"tokens": tokens, "dim": dim, "dtype": str(dtype).removeprefix("torch."), "rows": []}
    for name, sim, first, score in greedy_loops(features, gen):
        matrix = ops.from_matrix(sim)
        plain = matrix.__call__  # the same columns as a plain function: the torch loop, never the kernel
        for k in keeps:
            fused, first_ms, ran = greedy_stress.run_greedy(matrix, tokens, k, first, score, sim.device)
            row: dict[str, Any] = {
                "loop": name, "k": k, "kernel_ran": ran, "first_call_ms": first_ms,
                "equal": bool(torch.equal(fused, greedy_stress.run_greedy(plain, tokens, k, first, score,
                                                                          sim.device)[0]))}
            if name == "divprune":
                times: dict[str, list[float]] = {"torch_ms": [], "kernel_ms": []}
                for i in range(warmup + repeats):
                    for key, column in (("torch_ms", plain), ("kernel_ms", matrix)):
                        ms = greedy_stress.run_greedy(column, tokens, k, first, score, sim.device)[1]
                        if i >= warmup:
                            times[key].append(ms)
                row |= {key: median(v) for key, v in times.items()}
            out["rows"].append(row)
    state = kernel_status()
    out |= {"why_not": state["failure"] or kernel_unsupported(sim, 1, None), "kernel": state,
            "seconds": time.monotonic() - start}
    return out


def received_attention_check(patches: Sequence[int], device: str, dtype: torch.dtype, repeats: int, warmup: int
                             ) -> dict[str, Any]:
    """``ops.attention_transpose_apply`` (uniform weights: received attention) on random q/k [16, P, 80] in
    ``dtype`` for each patch count P: median milliseconds (``warmup`` + ``repeats`` synchronised calls) with the
    device's default blocks and with one head per block, and the largest relative difference between the two."""
    start = time.monotonic()
    gen = torch.Generator().manual_seed(0)
    clock = Timer(device)
    rows = []
    for n in patches:
        q, k = (torch.randn(ATTENTION_HEADS, n, ATTENTION_DIM, generator=gen).to(device=device, dtype=dtype)
                for _ in range(2))
        ones = torch.ones(ATTENTION_HEADS, n, device=device)
        row: dict[str, Any] = {"patches": n, "tokens": n // 4}
        outs = {}
        for key, group in (("default_ms", None), ("per_head_ms", 1)):
            times = []
            for i in range(warmup + repeats):
                begin = clock.mark()
                outs[key] = ops.attention_transpose_apply(q, k, ATTENTION_DIM ** -0.5, ones, heads_per_block=group)
                if i >= warmup:
                    times.append(1e3 * clock.seconds(begin, clock.mark()))
            row[key] = median(times)
        a, b = outs["default_ms"], outs["per_head_ms"]
        row["max_rel_diff"] = float(((a - b).abs() / b.abs().clamp(min=1e-30)).max())
        rows.append(row)
    return {"heads": ATTENTION_HEADS, "dim": ATTENTION_DIM, "dtype": str(dtype).removeprefix("torch."), "rows": rows,
            "seconds": time.monotonic() - start}


# ---- the time budget -------------------------------------------------------------------------------------
class Budget:
    """A global deadline, shared out evenly over the blocks still to run; counted from now, or from this
    process's start (``process=True``: the imports count too, as when run from the command line)."""

    def __init__(self, seconds: float, process: bool = False) -> None:
        import psutil

        since = max(0.0, time.time() - psutil.Process().create_time()) if process else 0.0
        self.start = time.monotonic() - since
        self.deadline = self.start + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def share(self, blocks: int, reserve: float = 0.0) -> float:
        """The deadline of the next of ``blocks`` blocks, ``reserve`` seconds kept back for later builds."""
        return time.monotonic() + max(0.0, self.left() - reserve) / max(blocks, 1)


@dataclass
class Options:
    """Repeats and sizes of a run."""

    methods: Sequence[str]
    repeats: int
    warmup: int
    new_tokens: int
    min_block_s: float  # a block with less time than this is skipped
    build_s: float  # time reserved for each model still to build


@torch.inference_mode()
def run_kernel(model: nn.Module, inputs: dict[str, Any], spec: ModelSpec, keeps: Sequence[int], kernel: str,
               opts: Options, deadline: float) -> dict[str, Any]:
    """Exactness, oracle equivalence, timing and the oracle ratio of one model on one attention kernel, inside
    ``deadline`` (a ``time.monotonic()`` value) as far as the mandatory first passes allow."""
    out: dict[str, Any] = {"attn": kernel, "status": "ok", "notes": []}
    start = time.monotonic()
    model.set_attn_implementation(kernel)
    reference = all_logits(model, inputs)
    out["keep_all"] = keep_all(model, inputs, reference, opts.methods)
    del reference
    settings, cells, out["oracle"] = [Setting(None)], [], []
    for name in opts.methods:
        for keep in keeps:
            options = method_options(name, keep)
            cell = eo.Cell(spec.family, options["site"], keep, options.get("layer") or LAYER, pruner=name)
            try:
                row = oracle_check(model, inputs, cell)
            except Exception as e:  # the method fails here: no timing for it, the error in the report
                out["oracle"].append({"method": name, "keep": keep, "error": f"{type(e).__name__}: {e}"})
                continue
            out["oracle"].append(row)
            settings.append(Setting(make_config(name, **options)))
            if "oracle_error" not in row:
                cells.append((cell, row))
    # the main table: up to ~65 % of what is left of the block, then the oracle timing
    bench_deadline = time.monotonic() + 0.65 * max(0.0, deadline - time.monotonic())
    result = run_bench(model, inputs, settings, repeats=opts.repeats, warmup=opts.warmup,
                       new_tokens=opts.new_tokens, progress=False, deadline=bench_deadline)
    out["passes"] = result.args["passes"]
    if out["passes"] < opts.repeats:
        out["notes"].append(f"time budget: {out['passes']} of {opts.repeats} timed passes")
    out["settings"] = result.as_dict()["results"]
    out["kernel_env"] = {k: result.env.get(k) for k in ("attn_implementation", "torch_threads", "dtype", "device")}
    _oracle_timing(model, inputs, cells, opts, deadline, out)
    out["seconds"] = time.monotonic() - start
    return out


def _oracle_timing(model: nn.Module, inputs: dict[str, Any], cells: list[tuple[eo.Cell, dict]], opts: Options,
                   deadline: float, out: dict[str, Any]) -> None:
    """Interleaved pruned/oracle prefills (one warm-up pass, then as many of ``opts.repeats`` passes as fit before
    ``deadline``, at least one); the ratios go into the oracle rows."""
    if not cells:
        return
    only = [c for c, _ in cells]
    t = time.monotonic()
    eo.time_cells(model, inputs, only, repeats=1, warmup=1)
    per_pass = (time.monotonic() - t) / 2
    more = min(opts.repeats - 1, int(max(0.0, deadline - time.monotonic()) // max(per_pass, 1e-9)))
    if more > 0:
        eo.time_cells(model, inputs, only, repeats=more, warmup=0)
    if 1 + max(more, 0) < opts.repeats:
        out["notes"].append(f"time budget: oracle ratio from {1 + max(more, 0)} of {opts.repeats} passes")
    for cell, row in cells:
        row |= {"pruned_ms": 1e3 * median(cell.pruned_s), "oracle_ms": 1e3 * median(cell.oracle_s),
                "ratio": cell.ratio, "paired_ratio": cell.paired_ratio, "oracle_passes": len(cell.oracle_s),
                "pruned_ms_all": [1e3 * t for t in cell.pruned_s], "oracle_ms_all": [1e3 * t for t in cell.oracle_s]}


def run_model(rec: dict[str, Any], spec: ModelSpec, kernels: Sequence[str], device: str, dtype: torch.dtype,
              dry_run: bool, opts: Options, budget: Budget, later_models: int, save: Any) -> None:
    """Build one model, then run every kernel as a block of the budget, filling ``rec`` (already in the
    report); ``save()`` after each block. A kernel that fails is recorded as such and the next one runs."""
    missing = {k: kernel_missing(k, device) for k in kernels}
    runnable = [k for k in kernels if missing[k] is None]
    if budget.left() < opts.build_s * (1 + later_models) + opts.min_block_s:
        rec["status"] = f"skipped: time budget ({budget.left():.0f} s left)"
        return
    t = time.monotonic()
    model, inputs = build(spec, dry_run, device, dtype)
    ids = inputs["input_ids"]
    visual = int((ids == model.config.image_token_id).sum())
    keeps = keeps_for(spec, visual, dry_run)
    rec |= {"status": "ok", "config": "tiny test config" if dry_run else str(resolve_model(spec.name)),
            "build_s": time.monotonic() - t, "params": sum(p.numel() for p in model.parameters()),
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "prompt_tokens": ids.shape[1], "visual_tokens": visual, "keeps": keeps,
            "image_size": image_size(spec, model.config, dry_run), "methods": list(opts.methods)}
    try:
        rec["greedy"] = greedy_check(visual, model.config.get_text_config().hidden_size,
                                     [k for k in GREEDY_KEEPS if k < visual] or keeps, device, dtype,
                                     repeats=opts.repeats, warmup=max(opts.warmup, 1))
    except Exception as e:  # recorded, not fatal: the rest of the model's report still runs
        rec["greedy"] = {"error": f"{type(e).__name__}: {e}"}
    for i, kernel in enumerate(kernels):
        if missing[kernel]:
            rec["kernels"].append({"attn": kernel, "status": f"skipped: {missing[kernel]}"})
            continue
        blocks = sum(1 for k in kernels[i:] if missing[k] is None) + later_models * len(runnable)
        deadline = budget.share(blocks, reserve=opts.build_s * later_models)
        if deadline - time.monotonic() < opts.min_block_s:
            rec["kernels"].append({"attn": kernel, "status": f"skipped: time budget ({budget.left():.0f} s left)"})
            continue
        try:
            rec["kernels"].append(run_kernel(model, inputs, spec, keeps, kernel, opts, deadline))
        except Exception as e:  # e.g. out of memory, or a method that breaks on this kernel
            rec["kernels"].append({"attn": kernel, "status": f"error: {type(e).__name__}: {e}"})
            _free(device)
        save()
    model.set_attn_implementation("sdpa")
    del model, inputs
    _free(device)


def _free(device: str) -> None:
    """Hand cached GPU memory back between blocks and models."""
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


# ---- the report --------------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:.0f}"


def _f(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: environment, then per model × kernel the timing table, the oracle table and the
    keep-all table."""
    env, meta = report["env"], report["meta"]
    dry = " (DRY RUN: tiny CPU models, not a measurement)" if meta["dry_run"] else ""
    machine = (f"{env.get('gpu', env['device'])}, driver {env.get('driver', 'n/a')}, torch {env['torch']} "
               f"(CUDA {env['torch_cuda']}, cuDNN {env.get('cudnn', 'n/a')}), transformers {env['transformers']}, "
               f"flash_attn {env['flash_attn'] or 'not installed'}, Python {env['python']}; {env['dtype']}; "
               f"{env['torch_threads']} torch thread(s) (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), "
               f"{env['cpu_count']} CPU cores ({env['cpu']}); vtprune at {env['commit']}"
               f"{' (files differ from that commit)' if env.get('files_differ_from_commit') else ''}.")
    method = (f"Medians of {meta['repeats']} timed passes after {meta['warmup']} warm-up (fewer where a note says "
              f"so), all settings interleaved; decode = greedy generate of {meta['new_tokens']} tokens. Budget "
              f"{meta['budget_s']:.0f} s, used {meta['elapsed_s']:.0f} s; complete: {meta['complete']}.")
    lines = [f"# vtprune GPU report {meta['date']}{dry}", "", machine, method, ""]
    for note in report["notes"]:
        lines.append(f"* {note}")
    lines += _attention_table(report.get("received_attention"))
    for m in report["models"]:
        lines += ["", f"## {m['name']} ({m['family']})", ""]
        if m["status"] != "ok":
            lines.append(f"{m['status']}")
            continue
        size = f"{m['params'] / 1e9:.2f} B" if m["params"] >= 1e8 else f"{m['params'] / 1e6:.2f} M"
        lines.append(f"{size} parameters ({m['weights_bytes'] / 2 ** 30:.2f} GiB), prompt "
                     f"{m['prompt_tokens']} tokens of which {m['visual_tokens']} visual, image {m['image_size']}, "
                     f"built in {m['build_s']:.0f} s.")
        lines += _greedy_table(m.get("greedy"))
        for k in m["kernels"]:
            lines += ["", f"### {m['name']}, attention {k['attn']}", ""]
            if k["status"] != "ok":
                lines.append(k["status"])
                continue
            lines += [f"* {n}" for n in k["notes"]]
            lines += _timing_table(k) + [""] + _oracle_table(k) + [""] + _keep_all_table(k)
    lines += ["", _dart_line(report)]
    return "\n".join(lines) + "\n"


def _attention_table(a: dict[str, Any] | None) -> list[str]:
    """The received-attention check: milliseconds per call with both block shapes."""
    if a is None:
        return []
    title = ["", f"**Received attention, one call** (random {a.get('dtype', '')} q/k, {a.get('heads')} heads × "
                 f"d = {a.get('dim')}: Qwen2.5-VL's last full-attention block)", ""]
    if "error" in a:
        return title + [f"failed: {a['error']}"]
    lines = title + ["| patches | visual tokens | default blocks ms | one head per block ms | max rel. difference |",
                     "|---|---|---|---|---|"]
    for r in a["rows"]:
        lines.append(f"| {r['patches']} | {r['tokens']} | {r['default_ms']:.2f} | {r['per_head_ms']:.2f} "
                     f"| {r['max_rel_diff']:.1e} |")
    return lines


def _greedy_table(g: dict[str, Any] | None) -> list[str]:
    """The greedy check of one model: same picks, and DivPrune's loop timed both ways."""
    if g is None:
        return []
    title = ["", (f"**Greedy selection: one Triton launch vs the torch loop** ({g.get('tokens')} random "
                  f"{g.get('dtype')} features of dim {g.get('dim')})")]
    if "error" in g:
        return title + ["", f"error: {g['error']}"]
    ran = all(r["kernel_ran"] for r in g["rows"])
    lines = title + ([] if ran else ["", f"kernel not used: {g['why_not']}"])
    lines += ["", "| loop | k | kernel ran | same picks | first call ms | torch loop ms | kernel ms | speedup |",
              "|---|---|---|---|---|---|---|---|"]
    for r in g["rows"]:
        speed = (f"{r['torch_ms'] / r['kernel_ms']:.1f}×" if r.get("kernel_ms") and r.get("torch_ms") else "")
        lines.append(f"| {r['loop']} | {r['k']} | {r['kernel_ran']} | **{r['equal']}** | {r['first_call_ms']:.2f} "
                     f"| {_f(r.get('torch_ms'), '.2f')} | {_f(r.get('kernel_ms'), '.2f')} | {speed} |")
    return lines


def _timing_table(k: dict[str, Any]) -> list[str]:
    lines = [("| setting | visual | prefill ms | speedup | TTFT ms | decode tok/s | selection ms | peak MiB "
              "| KV MiB |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in k["settings"]:
        lines.append(f"| {r['label']} | {r['visual_after']} / {r['visual_before']} | {r['prefill_ms']:.1f} "
                     f"| {r['speedup']:.2f}× | {_f(r.get('ttft_ms'), '.1f')} "
                     f"| {_f(r.get('decode_tokens_per_s'), '.1f')} | {r['select_ms']:.2f} "
                     f"| {_mib(r['peak_bytes'])} | {r['kv_bytes'] / 2 ** 20:.1f} |")
    return lines


def _oracle_table(k: dict[str, Any]) -> list[str]:
    lines = [("| method | keep | site | LLM rows kept / full | max abs Δ vs oracle (max abs logit) | bit-identical "
              "| pruned ms | oracle ms | oracle ratio (paired) |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in k["oracle"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['keep']} | error: {r['error'][:120]} |||||||")
            continue
        site = "pre_llm" if r["site"] == "pre_llm" else f"K={r['layer']}"
        diff = (f"{r['max_abs_diff']:.2e} ({r['max_abs_logit']:.2f})" if "max_abs_diff" in r
                else f"oracle error: {r['oracle_error'][:80]}")
        timing = (f"{r['pruned_ms']:.1f} | {r['oracle_ms']:.1f} | **{r['ratio']:.3f}** ({r['paired_ratio']:.3f})"
                  if "ratio" in r else "n/a | n/a | n/a")
        lines.append(f"| {r['method']} | {r['keep']} | {site} | {r['kept']} / {r['tokens']} | {diff} "
                     f"| {r.get('bit_identical', 'n/a')} | {timing} |")
    return lines


def _keep_all_table(k: dict[str, Any]) -> list[str]:
    lines = ["| keep-all | keep | max abs Δ vs unhooked | bit-identical |", "|---|---|---|---|"]
    for r in k["keep_all"]:
        keep = "1.0 (no selection)" if r["keep"] == 1.0 else f"{r['keep']} (select runs)"
        body = (f"{r['max_abs_diff']:.2e} | **{r['bit_identical']}**" if "error" not in r
                else f"error: {r['error'][:120]} |")
        lines.append(f"| {r['method']} | {keep} | {body} |")
    return lines


def _dart_line(report: dict[str, Any]) -> str:
    """DART's reported prefill speedup next to this run's."""
    ref = DART_REPORTED
    found = [f"{k['attn']}: {r['speedup']:.2f}×" for m in report["models"] if m["name"] == ref["model"]
             for k in m["kernels"] if k.get("status") == "ok" for r in k["settings"]
             if r["pruner"] == "dart" and r["keep"] == ref["keep"]]
    return (f"DART reports {ref['speedup']}× prefill at {ref['keep']}/2880 tokens on LLaVA-NeXT-7B; this run: "
            f"{', '.join(found) if found else 'not measured'}.")


def write(out: Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse options, run every model that can run, write the report; returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: the plumbing")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default bench/results/gpu-DATE)")
    parser.add_argument("--budget-s", type=float, default=None, help="global time budget (default 420; dry 600)")
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(m.name for m in MODELS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes (default 5; dry 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up passes (default 1; dry 0)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode length (default 16; dry 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; dry 1)")
    parser.add_argument("--device", default=None, help="default cuda (dry: cpu)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = args.device or ("cpu" if dry else "cuda")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda}); "
                         "check the driver (nvidia-smi) or run with --dry-run")
    if args.threads or dry:
        torch.set_num_threads(args.threads or 1)
    methods = [m for m in args.methods.split(",") if m]
    for name in methods:
        pruner_class(name)  # fail fast on an unknown method
    warmup = (0 if dry else 1) if args.warmup is None else args.warmup
    opts = Options(methods=methods, repeats=args.repeats or (2 if dry else 5), warmup=warmup,
                   new_tokens=args.new_tokens or (2 if dry else 16), min_block_s=0.0 if dry else 15.0,
                   build_s=0.0 if dry else 20.0)
    if opts.repeats < 1 or opts.warmup < 0 or opts.new_tokens < 1:
        raise SystemExit("need --repeats >= 1, --warmup >= 0, --new-tokens >= 1")
    budget = Budget(args.budget_s if args.budget_s is not None else (600.0 if dry else 420.0), process=argv is None)
    names = args.models.split(",") if args.models else [m.name for m in MODELS]
    unknown = set(names) - {m.name for m in MODELS}
    if unknown:
        raise SystemExit(f"unknown --models {sorted(unknown)}; expected names from {[m.name for m in MODELS]}")
    dtype = torch.bfloat16
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    out = args.out or Path(__file__).resolve().parent / "results" / f"gpu-{date}"
    report: dict[str, Any] = {
        "meta": {"date": date, "dry_run": dry, "argv": list(sys.argv if argv is None else argv),
                 "budget_s": budget.deadline - budget.start, "elapsed_s": 0.0, "complete": False,
                 "repeats": opts.repeats, "warmup": opts.warmup, "new_tokens": opts.new_tokens,
                 "methods": methods, "layer": LAYER, "kernels": list(DRY_KERNELS if dry else KERNELS)},
        "env": environment_record(device, dtype), "notes": [], "models": [], "dart_reported": DART_REPORTED}

    def save() -> None:
        report["meta"]["elapsed_s"] = time.monotonic() - budget.start
        report["greedy_kernel"] = kernel_status()  # a fallback to the torch loop is named here
        write(out, report)

    try:
        report["received_attention"] = received_attention_check(DRY_ATTENTION_PATCHES if dry else ATTENTION_PATCHES,
                                                                device, dtype, opts.repeats, max(opts.warmup, 1))
    except Exception as e:  # recorded, not fatal: the models still run
        report["received_attention"] = {"error": f"{type(e).__name__}: {e}"}
        _free(device)
    save()
    specs = []
    for spec in (m for m in MODELS if m.name in names):
        why = available(spec, dry)
        if why:
            report["notes"].append(f"{spec.name}: not run, {why}")
        else:
            specs.append(spec)
    for i, spec in enumerate(specs):
        print(f"[gpu_report] {spec.name}: {budget.left():.0f} s left", flush=True)
        rec: dict[str, Any] = {"name": spec.name, "family": spec.family, "status": "running", "kernels": []}
        report["models"].append(rec)
        try:
            run_model(rec, spec, report["meta"]["kernels"], device, dtype, dry, opts, budget, len(specs) - i - 1,
                      save)
        except Exception as e:  # one model failing (OOM at build, a family bug) must not lose the others
            rec["status"] = f"error: {type(e).__name__}: {e}"
            _free(device)
        save()
    report["meta"]["complete"] = True
    save()
    print(f"[gpu_report] wrote {out / 'report.json'} and {out / 'report.md'}", flush=True)
    return report


if __name__ == "__main__":
    main()
