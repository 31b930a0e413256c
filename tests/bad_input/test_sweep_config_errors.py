"""Malformed sweep YAML and pruner sites: every problem is refused at validation, naming the file and the field;
YAML 1.2 floats such as ``1e-3`` are numbers; each pruner runs at its own default site in sweeps and ``vtprune bench``
unless told otherwise."""

from __future__ import annotations

import pytest
from test_harness_schema import errors, write

from vtprune.benchmark import make_settings
from vtprune.cli import main
from vtprune.harness.cells import expand
from vtprune.harness.schema import TaskSpec, load_config
from vtprune.harness.synthetic import write_shapes_task
from vtprune.harness.tasks import load_task

BASE = {"models": [{"tiny": "llava"}], "tasks": [{"synthetic": "shapes", "size": 4}]}


@pytest.mark.parametrize("seed, expected", [(2**63, "less than or equal to 4294967295"), (2**32, "less than"),
                                            (-1, "greater than or equal to 0"), (True, "a valid integer"),
                                            ("3", "a valid integer"), (1.0, "a valid integer")])
def test_a_sweep_seed_out_of_range_or_not_an_int_is_refused_naming_file_and_field(tmp_path, seed, expected):
    path = write(tmp_path / "c.yaml", {**BASE, "seed": seed})
    text = errors(path)
    assert f"{path}: seed: Input should be" in text and expected in text


def test_the_largest_sweep_seed_loads(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", {**BASE, "seed": 2**32 - 1})).seed == 2**32 - 1


def test_a_bad_pruner_option_is_named_under_options(tmp_path):
    path = write(tmp_path / "c.yaml", {**BASE, "pruners": [
        {"name": "random", "keep": 2, "options": {"seed": "7"}},
        {"name": "dart", "keep": 0.5, "options": {"image_pivots": -1}},
        {"name": "dart", "keep": 0.5, "options": {"mode": "exact"}}]})
    text = errors(path)
    assert f"{path}: pruners[0].options.seed: seed must be an int" in text and "pruners[0].seed:" not in text
    assert f"{path}: pruners[1].options.image_pivots: image_pivots=-1" in text
    assert f"{path}: pruners[2].options.mode: mode='exact'" in text


def test_yaml_floats_in_exponent_form_are_numbers(tmp_path):
    path = write(tmp_path / "c.yaml", "models: [{tiny: llava}]\ntasks: [{synthetic: shapes, size: 4}]\n"
                                      "pruners: [{name: uniform, keep: [1e-3, 2.5E-1, 5.e-1, 64]}]\n")
    keep = load_config(path).pruners[0].keep
    assert keep == [0.001, 0.25, 0.5, 64] and [type(k) for k in keep] == [float, float, float, int]
    write(path, path.read_text().replace("64]", "1e3]"))  # a float, hence a fraction > 1: refused as a budget
    assert f"{path}: pruners[0].keep: keep=1000.0: a float keep is a fraction" in errors(path)
    write(path, path.read_text().replace("1e-3", "'1e-3'"))  # quoted: a string, as written
    assert f"{path}: pruners[0].keep[0]: Input should be a valid number" in errors(path)


def test_the_loader_stays_safe_and_never_runs_code_from_a_config(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path / "c.yaml", f"name: !!python/object/apply:os.system ['touch {marker}']\n"
                                      "models: [{tiny: llava}]\ntasks: [{synthetic: shapes}]\n")
    assert f"{path}: invalid YAML" in errors(path) and not marker.exists()


def test_each_pruner_runs_at_its_own_default_site(tmp_path):
    config = load_config(write(tmp_path / "c.yaml", {**BASE, "pruners": [
        {"name": "dart", "keep": 0.5}, {"name": "fastv", "keep": 4, "layer": 3}, {"name": "random", "keep": 0.5},
        {"name": "visionzip", "keep": 0.5, "layer": 3}]}))
    assert [[p["site"] for p in spec.grid()] for spec in config.pruners] == [["layer"], ["layer"], ["pre_llm"],
                                                                             ["pre_llm"]]
    task = load_task(TaskSpec(synthetic="shapes", size=4), write_shapes_task(tmp_path / "t", 4))
    cells = expand(config, [task])
    assert [(c.setting.method, c.setting.site, c.setting.layer) for c in cells[1:]] == [
        ("dart K=2", "layer", 2), ("fastv K=3", "layer", 3), ("random", "pre_llm", None), ("visionzip", "pre_llm", None)]


def test_an_unsupported_site_is_refused_at_validation_naming_file_field_and_supported_sites(tmp_path, capsys):
    (tmp_path / "inc").mkdir()
    write(tmp_path / "inc" / "pruners.yaml", {"pruners": [{"name": "dart", "keep": 0.5, "site": "pre_llm"},
                                                          {"name": "visionzip", "keep": 0.5, "site": ["layer"]},
                                                          {"name": "random", "keep": 0.5, "site": "layer"}]})
    path = write(tmp_path / "c.yaml", {**BASE, "include": "inc/pruners.yaml"})
    text = errors(path)
    lines = {line.strip().split(": ", 2)[1]: line for line in text.splitlines()[1:]}
    assert set(lines) == {"pruners[0].site", "pruners[1].site"}
    assert lines["pruners[0].site"].strip().startswith(f"{tmp_path / 'inc' / 'pruners.yaml'}: pruners[0].site: ")
    assert "'layer'" in lines["pruners[0].site"] and "'pre_llm'" in lines["pruners[1].site"]
    assert main(["sweep", str(path), "--check"]) == 2
    assert "pruners[0].site" in capsys.readouterr().err


def test_bench_uses_each_pruner_default_site_and_refuses_an_unsupported_one(capsys):
    labels = [s.label for s in make_settings(["dart", "random", "fastv"], [0.5], layer=3)]
    assert labels == ["unpruned", "dart K=3 keep=0.5", "random pre_llm keep=0.5", "fastv K=3 keep=0.5"]
    assert [s.label for s in make_settings(["random"], [4], site="layer")] == ["unpruned", "random K=2 keep=4"]
    status = main(["bench", "--model", "bench-small", "--random-weights", "--pruners", "random,dart", "--site",
                   "pre_llm", "--no-progress"])  # refused before any model is built
    err = capsys.readouterr().err
    assert status == 2 and "dart" in err and "'layer'" in err and "pre_llm" in err
