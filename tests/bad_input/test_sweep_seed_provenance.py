"""A rerun with a new ``seed:`` into an existing output folder uses the new seed's tiny model and synthetic task, so
its records match a run of that seed into an empty folder (and never claim inputs another seed generated)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from vtprune.harness.runner import run_sweep
from vtprune.harness.schema import load_config
from vtprune.harness.store import read_records

CONFIG = {"name": "s", "models": [{"tiny": "llava", "batch_size": 2}], "tasks": [{"synthetic": "shapes", "size": 2}],
          "pruners": [{"name": "dart", "keep": 0.5}], "generation": {"max_new_tokens": 1}}


def sweep(folder: Path, seed: int, out: Path) -> list[dict]:
    """Run CONFIG with ``seed`` into ``out``; its records of that seed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"seed{seed}.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "seed": seed}))
    run_sweep(load_config(path, output=out), progress=False)
    torch.set_num_threads(1)
    return [r for r in read_records(out / "results.jsonl") if r["seed"] == seed]


def test_a_new_seed_in_an_old_output_folder_gives_what_an_empty_folder_gives(tmp_path):
    first = sweep(tmp_path, 0, tmp_path / "shared")
    again = sweep(tmp_path, 1, tmp_path / "shared")
    fresh = sweep(tmp_path, 1, tmp_path / "fresh")
    assert [r["status"] for r in first + again + fresh] == ["ok"] * 6  # dart at its own site (layer) runs
    assert [r["method"] for r in fresh] == ["unpruned", "dart K=2"]
    assert first[0]["config"]["task"]["digest"] != fresh[0]["config"]["task"]["digest"]  # the seed makes the data
    for old_folder, new_folder in zip(again, fresh, strict=True):
        assert old_folder["cell"] == new_folder["cell"]
        assert old_folder["config"]["task"] == new_folder["config"]["task"]
        assert old_folder["metrics"] == new_folder["metrics"]
        predictions = [(tmp_path / out / r["predictions"]).read_text()
                       for out, r in (("shared", old_folder), ("fresh", new_folder))]
        assert predictions[0] == predictions[1]
