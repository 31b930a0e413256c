"""The results store under concurrency, kills and damage: two sweeps on one output folder and the shards of
``--shard I/N`` (real processes) run every cell exactly once with its baseline's ratios; a sweep killed with
``kill -9`` while it holds a cell's lock resumes; damaged and truncated lines are named (file:line); output paths
of the wrong kind, and filesystems without locks, are refused before any cell runs."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vtprune.cli import main
from vtprune.errors import VTPruneError
from vtprune.harness.cells import expand
from vtprune.harness.parallel import Parallel
from vtprune.harness.runner import prepare, run_sweep, shard_cells
from vtprune.harness.schema import load_config
from vtprune.harness.store import ResultsStore

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "name": "c", "seed": 0,
    "models": [{"tiny": "llava", "batch_size": 4}],
    "pruners": [{"name": "uniform", "keep": [0.5, 0.25, 4, 2]}, {"name": "random", "keep": [0.5, 4, 1]}],
    "tasks": [{"synthetic": "shapes", "size": 8}],
    "generation": {"max_new_tokens": 2},
}
CELLS = 8  # the baseline and seven settings


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(config path, an output folder holding the generated task and tiny model, copied by each test so that the
    processes it starts spend their time on cells)."""
    folder = tmp_path_factory.mktemp("prepared")
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    prepare(load_config(path, output=folder / "out"), Parallel())
    return path, folder / "out"


@pytest.fixture
def out(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared[1], tmp_path / "out"))


def sweep_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vtprune.cli", "sweep", str(config), "--out", str(out), "--no-progress",
            "--no-leaderboard", *extra]


def run_together(commands: list[list[str]], cwd: Path) -> list[str]:
    """Start every command at once; returns their stderr after checking that each exited 0."""
    procs = [subprocess.Popen(cmd, env=env(), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    return errs


def ok_count(stderr: str) -> int:
    return int(re.search(r"(\d+) cell\(s\) ok", stderr).group(1))


def check_complete(out: Path) -> list[dict]:
    """Every cell recorded exactly once, successfully, and every pruned cell's ratios taken from the baseline."""
    records = ResultsStore(out / "results.jsonl").records()
    assert len(records) == CELLS and len({r["cell"] for r in records}) == CELLS
    assert all(r["status"] == "ok" for r in records)
    (base,) = [r for r in records if r["method"] == "unpruned"]
    for r in records:
        assert r["baseline_cell"] == base["cell"] and r["flops"]["fastv_ratio"] is not None
    return records


def test_two_sweeps_on_one_folder_run_every_cell_once(prepared, out, tmp_path):
    errs = run_together([sweep_cmd(prepared[0], out)] * 2, tmp_path)
    check_complete(out)
    assert sum(map(ok_count, errs)) == CELLS  # each cell run by one of them, the other one skipped it


def test_shards_split_the_cells_and_their_union_is_the_sweep(prepared, out, tmp_path, capsys):
    cells = expand(load_config(prepared[0], output=out), prepare(load_config(prepared[0], output=out), Parallel()))
    errs = run_together([sweep_cmd(prepared[0], out, "--shard", f"{i}/2") for i in range(2)], tmp_path)
    records = check_complete(out)
    ran: dict[int, set[str]] = {0: set(), 1: set()}
    for r in records:
        shard = r["env"]["argv"][r["env"]["argv"].index("--shard") + 1]
        ran[int(shard[0])].add(r["cell"])
    baseline = {cells[0].hash}  # of shard 0; shard 1 needs it too, and one of them runs it
    for i in range(2):
        assert ran[i] - baseline == {c.hash for c in cells[i::2]} - baseline
        assert ran[i] <= {c.hash for c in shard_cells(cells, (i, 2))}
    assert sum(map(ok_count, errs)) == CELLS
    assert main(["sweep", str(prepared[0]), "--out", str(out), "--check", "--shard", "1/2"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [cells[0].hash] + [c.hash for c in cells[1::2]]  # its cells, after the baseline they need


def test_a_shard_alone_runs_the_baseline_and_a_later_shard_reuses_it(prepared, out):
    config = load_config(prepared[0], output=out)
    first = run_sweep(config, progress=False, shard=(1, 2))
    second = run_sweep(config, progress=False, shard=(0, 2))
    torch.set_num_threads(1)
    assert first.counts == {"ok": 5, "error": 0}  # cells 1, 3, 5, 7 and the baseline (cell 0, of shard 0)
    assert second.counts == {"ok": 3, "error": 0}  # cells 2, 4, 6: the baseline is finished
    check_complete(out)


@pytest.mark.parametrize("shard", ["3/3", "-1/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_refused(prepared, shard, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(prepared[0]), f"--shard={shard}"])
    assert exit_.value.code == 2 and f"argument --shard: shard '{shard}': expected" in capsys.readouterr().err


def test_a_sweep_killed_while_holding_a_cell_resumes(prepared, out, tmp_path):
    results = out / "results.jsonl"
    proc = subprocess.Popen(sweep_cmd(prepared[0], out), env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline, held = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None and held is None:
        done = {r["cell"] for r in ResultsStore(results).records()}
        if len(done) >= 2:  # kill it while it runs its next cell: the lock file of a cell without a record
            held = next((p for p in (out / "locks").glob("*.lock") if p.stem not in done | {"probe"}
                         and f"pid {proc.pid} " in p.read_text()), None)
        if held is None:
            time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and held is not None, proc.stderr.read().decode()[-2000:]
    before = results.read_text()
    assert held.stem not in before
    with open(held) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the lock died with its process; the file stays
    run = run_sweep(load_config(prepared[0], output=out), progress=False)
    torch.set_num_threads(1)
    assert run.counts == {"ok": CELLS - before.count("\n"), "error": 0}
    assert results.read_text().startswith(before)  # nothing lost or rewritten
    check_complete(out)


def test_a_truncated_last_record_is_named_and_its_cell_runs_again(prepared, out, capsys):
    assert main(["sweep", str(prepared[0]), "--out", str(out), "--no-progress", "--no-leaderboard"]) == 0
    results = out / "results.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    results.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])  # a copy cut short
    capsys.readouterr()
    assert main(["sweep", str(prepared[0]), "--out", str(out), "--no-progress"]) == 0
    torch.set_num_threads(1)
    err = capsys.readouterr().err
    assert f"skipped 1 damaged line(s) that are not a JSON record: {results}:{CELLS}" in err
    assert f"{CELLS} cells ({CELLS - 1} finished earlier, 1 to run)" in err
    assert f"vtprune: warning: skipped 1 damaged line(s) that are not a JSON record: {results}:{CELLS}" in err
    check_complete(out)
    assert results.read_bytes().splitlines()[CELLS - 1] == lines[-1][:40]  # the record after it has its own line


def test_the_leaderboard_names_damaged_lines_and_refuses_a_file_without_records(prepared, out, tmp_path, capsys):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('not json\n{"cell": "x"}\n[1, 2]\n\n{"cell": "y", "status": "o')
    assert main(["leaderboard", str(garbage), "--out", str(tmp_path / "board")]) == 2
    err = capsys.readouterr().err
    assert "holds no valid record: skipped 4 damaged line(s)" in err
    assert all(f"{garbage}:{n}" in err for n in (1, 2, 3, 5)) and f"{garbage}:4" not in err
    garbage.write_text("")
    assert main(["leaderboard", str(garbage), "--out", str(tmp_path / "board")]) == 2
    assert "holds no valid record (it is empty)" in capsys.readouterr().err
    record = {"schema": "vtprune-result-1", "cell": "z", "status": "error", "model": "m", "task": "t",
              "method": "uniform", "keep": 4, "error": "E"}
    garbage.write_text("\x00\xff garbage\n" + json.dumps(record) + "\n")
    assert main(["leaderboard", str(garbage), "--out", str(tmp_path / "board")]) == 0
    assert f"skipped 1 damaged line(s) that are not a JSON record: {garbage}:1" in capsys.readouterr().err


def test_store_reads_incrementally_and_numbers_damaged_lines(tmp_path):
    store, other = ResultsStore(tmp_path / "r.jsonl"), ResultsStore(tmp_path / "r.jsonl")
    store.append({"cell": "a", "status": "ok"})
    with open(store.path, "ab") as f:
        f.write(b"garbage\n")
    store.append({"cell": "b", "status": "error"})
    assert [r["cell"] for r in other.records()] == ["a", "b"] and other.damaged == [2]
    with open(store.path, "ab") as f:
        f.write(b'{"cell": "c", "status": "o')  # a writer killed mid-line (not by vtprune's single write)
    assert [r["cell"] for r in other.records()] == ["a", "b"] and other.damaged == [2, 4]
    store.append({"cell": "c", "status": "ok"})
    assert [r["cell"] for r in other.records()] == ["a", "b", "c"] and other.damaged == [2, 4]
    assert other.records() == store.records() and store.damaged == [2, 4]
    store.path.write_text(json.dumps({"cell": "d", "status": "ok"}) + "\n")  # replaced: read from the start
    assert [r["cell"] for r in other.records()] == ["d"] and other.damaged == []


@pytest.mark.parametrize("case", ["out is a file", "results is a folder", "locks is a file", "board is a file"])
def test_output_paths_of_the_wrong_kind_are_refused_before_running(prepared, out, case, capsys):
    target = {"out is a file": out, "results is a folder": out / "results.jsonl", "locks is a file": out / "locks",
              "board is a file": out / "leaderboard"}[case]
    shutil.rmtree(target, ignore_errors=True)
    if case == "results is a folder":
        target.mkdir()
    else:
        target.write_text("x")
    assert main(["sweep", str(prepared[0]), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and ("is a file" in err or "is a folder" in err)
    if out.is_dir():
        assert not (out / "predictions").exists()  # refused before any cell ran
    if case != "board is a file":  # --check writes no leaderboard
        assert main(["sweep", str(prepared[0]), "--out", str(out), "--check"]) == 2
        assert str(target) in capsys.readouterr().err
    else:
        assert main(["leaderboard", str(prepared[1]), "--out", str(target)]) == 2
        assert f"--out {target} is a file" in capsys.readouterr().err


def test_a_filesystem_without_locks_is_refused_before_running(prepared, out, monkeypatch):
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(VTPruneError, match=r"file locks do not work in .*: use a local disk"):
        run_sweep(load_config(prepared[0], output=out), progress=False)
    assert not (out / "results.jsonl").exists()
