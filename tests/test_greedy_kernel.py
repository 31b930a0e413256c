"""The one-launch Triton greedy kernel (vtprune.kernels, vtprune.triton_greedy) against the torch loop of
``ops.greedy``, bit for bit, run on CPU tensors by Triton's interpreter: every caller's score form, float32 / bf16 /
fp16 matrices, ties (duplicated tokens), k = 1 and k = V, V not a power of two, the methods end to end, and
negative controls (a kernel without the bf16 rounding, a mismatched score form, highest-index ties all differ). The
interpreter needs ``TRITON_INTERPRET=1`` before Triton is imported, so those cases run in one subprocess (this file
run as a script); the dispatch rules and the loud fallback are tested in process with a stand-in kernel.
Checked on an H200 too (Triton 3.6): the same picks in 536 cases, see docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from bench_scripts import bench_script

from vtprune import kernels, ops
from vtprune.errors import VTPruneError
from vtprune.methods.divprune import nearest_neighbour_seed
from vtprune.methods.kcenter import farthest_on_average_seed
from vtprune.registry import build_pruner, make_config
from vtprune.view import ImageLayout, VisualView


def _sim(features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    unit = ops.unit_rows(features, dtype)
    return unit @ unit.T


def _features(tokens: int, dim: int, seed: int, distinct: int | None = None) -> torch.Tensor:
    """Random features; with ``distinct``, only that many different rows (duplicates: exact ties)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(distinct or tokens, dim, generator=g)
    return base if distinct is None else base[torch.randint(0, distinct, (tokens,), generator=g)]


def _view(features: torch.Tensor) -> VisualView:
    return VisualView(features=features, text=torch.zeros(0, features.shape[1]), site="pre_llm", layer=None,
                      layout=ImageLayout.flat(features.shape[0]), sample=0, image=0, extras={})


# ---- the cases run by the interpreter (in the subprocess) ---------------------------------------------------
def _cases() -> dict[str, object]:
    """name -> a function of no arguments returning picks (a tensor), run once with the kernel, once without."""
    x, dup = _features(100, 16, 0), _features(45, 8, 1, distinct=6)
    mid = _features(129, 12, 2)
    sens = torch.rand(129, generator=torch.Generator().manual_seed(3)).round(decimals=1)  # ties in the weights
    imp = ops.min_max(mid.norm(dim=-1), eps=1e-6)
    cases: dict[str, object] = {}
    for k in (1, 2, 17, 100):  # k = 1 and k = V included
        cases[f"max-min fp32 V=100 k={k}"] = (
            lambda k=k: ops.max_min(ops.from_matrix(_sim(x)), 100, k, nearest_neighbour_seed(_sim(x)), "cpu"))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        cases[f"duplicated tokens {name} k=V"] = (
            lambda d=dtype: ops.max_min(ops.from_matrix(_sim(dup, d)), 45, 45, 0, "cpu"))
        cases[f"max-min {name} V=129 k=60"] = (
            lambda d=dtype: ops.max_min(ops.from_matrix(_sim(mid, d)), 129, 60,
                                        nearest_neighbour_seed(_sim(mid, d), second_smallest=True), "cpu"))
        cases[f"mmr {name} V=129 k=40"] = lambda d=dtype: ops.mmr(ops.from_matrix(_sim(mid, d)), imp, 40, 0.3)
        cases[f"sads {name} V=129 k=40"] = lambda d=dtype: ops.sads(ops.from_matrix(_sim(mid, d)), sens, 40)
    cases["k-center seed fp32 V=129 k=50"] = lambda: ops.max_min(
        ops.from_matrix(_sim(mid)), 129, 50, farthest_on_average_seed(ops.unit_rows(mid)), "cpu")
    cases["one token"] = lambda: ops.max_min(ops.from_matrix(_sim(x[:1])), 1, 1, 0, "cpu")
    feats = _features(90, 16, 4).to(torch.bfloat16)  # what a bf16 model hands the methods
    for mode in ("clean", "reference"):
        cases[f"divprune.select {mode}"] = (
            lambda m=mode: build_pruner(make_config("divprune", keep=30, mode=m)).select(_view(feats), 30).indices)
    return cases


def _negative_controls(stress: types.ModuleType) -> dict[str, bool]:
    """Whether each deliberately wrong variant differs from the torch loop (it must)."""
    from vtprune.triton_greedy import FARTHEST, NO_ROUNDING

    x = _features(80, 64, 100)
    sim_bf16, sim = _sim(x, torch.bfloat16), _sim(x)
    imp = ops.min_max(x.norm(dim=-1), eps=1e-6)
    dup = _sim(_features(45, 8, 1, distinct=6))
    lowest = ops.max_min(lambda j: ops.row(dup, j), 45, 45, 0, "cpu")
    reversed_order = dup.flip(0).flip(1)  # lowest-index ties there are highest-index ties here
    highest = 44 - ops.max_min(lambda j: ops.row(reversed_order, j), 45, 45, 44, "cpu")
    return {
        "bf16 matrix without rounding": not torch.equal(
            stress.launch(sim_bf16, 79, 5, FARTHEST, NO_ROUNDING),
            ops.max_min(lambda j: ops.row(sim_bf16, j), 80, 79, 5, "cpu")),
        "mmr relevance run as a farthest weight": not torch.equal(
            stress.launch(sim, 60, 5, FARTHEST, NO_ROUNDING, 0.3 * imp, 0.7),
            ops.greedy(lambda j: ops.row(sim, j), 80, 60, 5, ops.Marginal(0.3 * imp, 0.7), "cpu")),
        "ties to the highest index": not torch.equal(lowest, highest),
        "the control launcher itself matches": torch.equal(stress.launch(sim, 79, 5, FARTHEST, NO_ROUNDING),
                                                           ops.max_min(lambda j: ops.row(sim, j), 80, 79, 5, "cpu")),
    }


def run_interpreted(out: str) -> None:
    """Every case with the kernel (interpreted) and with the torch loop, the negative controls and the GPU report's
    greedy check; written to ``out`` as JSON."""
    results: dict[str, dict] = {}
    for name, case in _cases().items():
        os.environ[kernels.ENV] = "0"
        want = case()
        os.environ[kernels.ENV] = "1"
        launches = kernels.status()["launches"]
        got = case()
        results[name] = {"kernel": got.tolist(), "torch": want.tolist(),
                         "launched": kernels.status()["launches"] - launches}
    with bench_script("gpu_report") as gpu_report:
        check = gpu_report.greedy_check(40, 16, [3, 12], "cpu", torch.bfloat16, repeats=1, warmup=1)
    with bench_script("greedy_stress") as stress:
        controls = _negative_controls(stress)
        sweep = stress.main(["--device", "cpu", "--sizes", "1,37", "--seeds", "1", "--controls", "1",
                             "--control-tokens", "80"])
    Path(out).write_text(json.dumps({"cases": results, "negative": controls, "check": check, "stress": sweep,
                                     "status": kernels.status()}, default=str))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    if importlib.util.find_spec("triton") is None:  # torch's Linux x86 wheels bring it; other platforms may not
        pytest.skip("triton is not installed: the kernel cannot run, the torch loop always does")
    out = tmp_path_factory.mktemp("greedy-kernel") / "results.json"
    env = os.environ | {"TRITON_INTERPRET": "1", kernels.ENV: "1"}
    tests = Path(__file__).resolve().parent
    subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=tests, check=True, timeout=600)
    return json.loads(out.read_text())


CASE_NAMES = list(_cases())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_kernel_picks_equal_the_torch_loop(interpreted, name):
    case = interpreted["cases"][name]
    assert case["launched"] >= 1, "the kernel did not run: the case compared the torch loop with itself"
    assert case["kernel"] == case["torch"]  # pick order included


def test_ties_and_the_full_budget_pick_every_token_once(interpreted):
    for dtype in ("float32", "bfloat16", "float16"):
        assert sorted(interpreted["cases"][f"duplicated tokens {dtype} k=V"]["kernel"]) == list(range(45))


@pytest.mark.parametrize("control", ["bf16 matrix without rounding", "mmr relevance run as a farthest weight",
                                     "ties to the highest index"])
def test_negative_controls_differ(interpreted, control):
    assert interpreted["negative"][control] is True
    assert interpreted["negative"]["the control launcher itself matches"] is True


def test_gpu_report_greedy_check_runs_the_kernel(interpreted):
    check = interpreted["check"]
    assert {r["loop"] for r in check["rows"]} == {"divprune", "divprune reference (bfloat16)", "k-center score",
                                                   "mmr score", "sads score"}
    assert all(r["kernel_ran"] and r["equal"] for r in check["rows"]) and check["why_not"] is None
    timed = [r for r in check["rows"] if r["loop"] == "divprune"]
    assert [r["k"] for r in timed] == [3, 12] and all(r["torch_ms"] > 0 and r["kernel_ms"] > 0 for r in timed)
    assert interpreted["status"]["failure"] is None and interpreted["status"]["interpreter"] is True


def test_the_stress_script_runs_every_case_and_its_negative_control(interpreted):
    """bench/greedy_stress.py (the GPU check of docs/benchmarks.md) at CPU sizes: V = 1 (k = 1) and 37 (k = 1, 2,
    37), with and without duplicates, 3 dtypes, 4 score forms."""
    sweep = interpreted["stress"]
    assert sweep["stress"]["cases"] == 2 * 3 * 4 * (1 + 3) and sweep["stress"]["mismatches"] == []
    assert sweep["negative"] == {"trials": 1, "unrounded_differs": 1, "kernel_matches": 1}
    assert sweep["kernel_times"] == [] and sweep["kernel"]["failure"] is None  # no V above k = 64 here


# ---- the dispatch, in process (no Triton import) -----------------------------------------------------------
@pytest.fixture
def fresh(monkeypatch):
    """A clean kernel state; the caller decides what the kernel module is."""
    monkeypatch.setattr(kernels, "_state", {"failure": None, "launches": 0})
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _stand_in(monkeypatch, launch) -> None:
    """``vtprune.triton_greedy`` replaced by a module whose kernel runs ``launch(*args, **kwargs)``; kernels apply
    to CPU tensors (as under the interpreter)."""
    module = types.ModuleType("vtprune.triton_greedy")
    module.greedy_kernel = type("Kernel", (), {"__getitem__": lambda self, grid: launch})()
    monkeypatch.setitem(sys.modules, "vtprune.triton_greedy", module)
    monkeypatch.setattr(kernels, "_interpreting", lambda: True)


def test_on_cpu_without_the_interpreter_the_torch_loop_runs(fresh):
    sim = _sim(_features(30, 8, 0))
    assert kernels.unsupported(sim, 5, None) == "the matrix is on cpu, not CUDA"
    picks = ops.max_min(ops.from_matrix(sim), 30, 5, 0, "cpu")
    assert torch.equal(picks, ops.max_min(lambda j: ops.row(sim, j), 30, 5, 0, "cpu"))
    assert kernels.status()["launches"] == 0 and kernels.status()["failure"] is None


def test_a_failing_kernel_warns_once_names_the_reason_and_falls_back(fresh, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTX compile failed (stand-in)")

    _stand_in(monkeypatch, broken)
    sim = _sim(_features(30, 8, 0))
    want = ops.max_min(lambda j: ops.row(sim, j), 30, 7, 0, "cpu")
    with pytest.warns(RuntimeWarning, match=r"Triton greedy kernel is off .*PTX compile failed \(stand-in\)"):
        assert torch.equal(ops.max_min(ops.from_matrix(sim), 30, 7, 0, "cpu"), want)
    assert kernels.status()["failure"] == "RuntimeError: PTX compile failed (stand-in)"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert torch.equal(ops.max_min(ops.from_matrix(sim), 30, 7, 0, "cpu"), want)
    assert len(calls) == 1 and kernels.status()["launches"] == 0  # not retried


def test_triton_missing_warns_and_falls_back(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, "vtprune.triton_greedy", None)  # import fails as if Triton were missing
    monkeypatch.setattr(kernels, "_interpreting", lambda: True)
    sim = _sim(_features(20, 8, 0))
    with pytest.warns(RuntimeWarning, match="ModuleNotFoundError"):
        picks = ops.max_min(ops.from_matrix(sim), 20, 4, 0, "cpu")
    assert torch.equal(picks, ops.max_min(lambda j: ops.row(sim, j), 20, 4, 0, "cpu"))


def test_the_kernel_is_asked_only_where_it_applies(fresh, monkeypatch):
    seen = []
    _stand_in(monkeypatch, lambda *args, **kwargs: seen.append(kwargs))
    sim = _sim(_features(20, 8, 0))
    ops.mmr(ops.from_matrix(sim), torch.rand(20), 4, 0.5)  # a Marginal score over a matrix: asked
    assert seen[-1]["MODE"] == 1 and seen[-1]["HAS_VEC"] and seen[-1]["enable_fp_fusion"] is False
    ops.sads(ops.from_matrix(sim.to(torch.bfloat16)), torch.rand(20), 4)
    assert (seen[-1]["MODE"], seen[-1]["HAS_VEC"], seen[-1]["ROUND"], seen[-1]["BLOCK"]) == (0, True, 1, 32)
    asked = len(seen)
    ops.mmr(ops.on_demand(ops.unit_rows(sim)), torch.rand(20), 4, 0.5)  # columns computed on demand
    ops.greedy(ops.from_matrix(sim), 20, 4, 0, lambda m: 1 - m, "cpu")  # a score the kernel does not know
    ops.mmr(ops.from_matrix(sim), torch.rand(20), 4, 0.5, per_step=2)  # several picks per step
    ops.max_min(ops.from_matrix(sim.double()), 20, 4, 0, "cpu")  # float64
    ops.max_min(ops.from_matrix(sim[:, :19]), 19, 4, 0, "cpu")  # not square
    monkeypatch.setattr(kernels, "MAX_TOKENS", 16)
    ops.max_min(ops.from_matrix(sim), 20, 4, 0, "cpu")  # above the token limit
    monkeypatch.setattr(kernels, "MAX_TOKENS", 16384)
    monkeypatch.setenv(kernels.ENV, "0")
    ops.max_min(ops.from_matrix(sim), 20, 4, 0, "cpu")  # turned off
    assert len(seen) == asked


def test_unsupported_names_what_is_wrong(fresh, monkeypatch):
    monkeypatch.setattr(kernels, "_interpreting", lambda: True)
    sim = _sim(_features(10, 4, 0))
    assert "k = 0" in kernels.unsupported(sim, 0, None)
    assert "float64" in kernels.unsupported(sim.double(), 3, None)
    assert "bfloat16" in kernels.unsupported(sim, 3, torch.ones(10, dtype=torch.bfloat16))
    assert "unit last stride" in kernels.unsupported(sim.T[::1, ::2], 3, None)
    assert kernels.unsupported(sim, 3, torch.ones(10)) is None


def test_bad_settings_are_named(fresh, monkeypatch):
    monkeypatch.setenv(kernels.ENV, "yes")
    with pytest.raises(VTPruneError, match="VTPRUNE_TRITON='yes'"):
        kernels.enabled()
    monkeypatch.setenv(kernels.ENV, "1")
    with pytest.raises(VTPruneError, match="score form 'nearest'"):
        kernels.greedy_on_matrix(torch.eye(3), 2, 0, "nearest")


def test_greedy_check_without_a_gpu_says_why_the_kernel_did_not_run(fresh):
    with bench_script("gpu_report") as gpu_report:
        check = gpu_report.greedy_check(24, 8, [3, 6], "cpu", torch.bfloat16, repeats=1, warmup=0)
        table = "\n".join(gpu_report._greedy_table(check))
    assert check["why_not"] == "the matrix is on cpu, not CUDA"
    assert all(r["equal"] and not r["kernel_ran"] for r in check["rows"]) and len(check["rows"]) == 10
    assert "kernel not used: the matrix is on cpu, not CUDA" in table and "| divprune | 6 | False | **True**" in table


if __name__ == "__main__":
    run_interpreted(sys.argv[1])
