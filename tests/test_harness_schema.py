"""Sweep config validation (file + field + expectation in every error, includes), the grid and its hashes, local task
folders and the metrics. No model runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vtprune.errors import VTPruneError
from vtprune.harness import metrics as M
from vtprune.harness.cells import expand
from vtprune.harness.schema import ConfigError, TaskSpec, load_config
from vtprune.harness.synthetic import write_shapes_task
from vtprune.harness.tasks import load_task

BASE = {"models": [{"tiny": "llava"}], "tasks": [{"synthetic": "shapes", "size": 4}],
        "pruners": [{"name": "uniform", "keep": [0.5, 4]}]}


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def errors(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return str(e.value)


def test_a_valid_config_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path / "ok.yaml", BASE))
    assert config.name == "ok" and config.backend == "local" and config.models[0].name == "tiny-llava"
    assert config.pruners[0].keep == [0.5, 4] and isinstance(config.pruners[0].keep[1], int)
    assert config.output_dir == (Path.cwd() / "runs" / "ok").resolve()


def test_unknown_keys_name_the_file_the_field_and_the_allowed_keys(tmp_path):
    path = write(tmp_path / "c.yaml", {**BASE, "modles": [], "models": [{"tiny": "llava", "batchsize": 2}]})
    text = errors(path)
    assert f"{path}: modles: unknown key; expected one of" in text and "models, name" in text
    assert f"{path}: models[0].batchsize: unknown key; expected one of attn, batch_size" in text


def test_type_and_value_errors_say_what_was_expected(tmp_path):
    path = write(tmp_path / "c.yaml", {**BASE, "pruners": [{"name": "uniform", "keep": [0.5, "lots"],
                                                               "site": "middle"}],
                                       "generation": {"max_new_tokens": 0}, "backend": "vllm"})
    text = errors(path)
    assert "pruners[0].keep[1]: Input should be a valid number, or Input should be a valid integer (got 'lots')" in text
    assert "pruners[0].site[0]: Input should be 'pre_llm' or 'layer' (got 'middle')" in text
    assert "generation.max_new_tokens: Input should be greater than or equal to 1 (got 0)" in text
    assert "backend: Input should be 'local' or 'lmms_eval' (got 'vllm')" in text
    assert "tasks: required, missing" in errors(write(tmp_path / "d.yaml", {"models": BASE["models"]}))


def test_pruner_settings_are_validated_through_the_registry(tmp_path):
    path = write(tmp_path / "c.yaml", {**BASE, "pruners": [
        {"name": "unifrom", "keep": 0.5}, {"name": "random", "keep": [1.5]},
        {"name": "random", "keep": 2, "options": {"colour": "red"}},
        {"name": "random", "keep": 2, "site": "layer", "layer": [0, 2]}]})
    text = errors(path)
    assert f"{path}: pruners[0].name: unknown pruner 'unifrom'" in text and "Did you mean uniform?" in text
    assert "pruners[1].keep: keep=1.5: a float keep is a fraction" in text
    assert "pruners[2].options: unknown option(s) ['colour'] for pruner 'random'" in text
    assert "pruners[3].layer: layer=0: in-LLM pruning needs an int layer K >= 1" in text
    text = errors(write(path, {**BASE, "pruners": [{"name": "random", "keep": 2, "options": {"keep": 3}}]}))
    assert "pruners[0].options: ['keep'] are grid fields of the pruner entry, not options" in text


def test_model_sources_and_paths_are_checked(tmp_path):
    path = write(tmp_path / "c.yaml", {**BASE, "models": [
        {"path": "missing-dir"}, {"config": "bench-small"}, {"tiny": "llava", "path": "x"},
        {"config": "bench-small", "random_weights": True, "processor": str(tmp_path)},
        {"config": "no-such-config", "random_weights": True, "processor": str(tmp_path)}],
        "tasks": [{"path": "no-task"}, {"synthetic": "shapes", "path": "x"}]})
    text = errors(path)
    assert "models[1]: a config holds no weights: set random_weights: true" in text
    assert "models[2]: give exactly one of path / config / tiny (got ['path', 'tiny'])" in text
    assert "tasks[1]: give exactly one of path (a task folder) / synthetic" in text
    # the structural errors come first; fix them and the filesystem checks report
    data = yaml.safe_load(path.read_text())
    data["models"] = [data["models"][0], data["models"][3], data["models"][4]]
    data["tasks"] = [data["tasks"][0]]
    text = errors(write(path, data))
    assert f"models[0].path: no such directory {tmp_path / 'missing-dir'}" in text
    assert "models[2].config: unknown model 'no-such-config'" in text
    assert f"tasks[0].path: no such task folder {tmp_path / 'no-task'}" in text
    assert "models[1]" not in text  # a shipped config name + a processor directory is fine


def test_include_merges_and_errors_name_the_file_that_set_the_field(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "base.yaml", {"models": [{"tiny": "llava", "dtype": "float64"}],
                                           "tasks": [{"path": "tasks/t"}], "generation": {"max_new_tokens": 3}})
    child = write(tmp_path / "child.yaml", {"include": "sub/base.yaml", "pruners": [{"name": "random", "keep": 2}],
                                            "generation": {"max_new_tokens": 5}})
    assert f"{tmp_path / 'sub' / 'base.yaml'}: models[0].dtype: Input should be" in errors(child)
    data = yaml.safe_load((tmp_path / "sub" / "base.yaml").read_text())
    data["models"][0]["dtype"] = "float32"
    write(tmp_path / "sub" / "base.yaml", data)
    # a relative path resolves against the directory of the file that sets it (sub/), not the current directory
    assert f"base.yaml: tasks[0].path: no such task folder {tmp_path / 'sub' / 'tasks' / 't'}" in errors(child)
    data["tasks"] = [{"synthetic": "shapes"}]
    write(tmp_path / "sub" / "base.yaml", data)
    config = load_config(child)
    assert config.generation.max_new_tokens == 5 and config.pruners[0].name == "random"
    assert config.models[0].dtype == "float32"
    write(tmp_path / "loop.yaml", {"include": "loop.yaml"})
    assert "include cycle" in errors(tmp_path / "loop.yaml")
    assert "invalid YAML" in errors(write(tmp_path / "bad.yaml", "models: [\n"))


def test_the_grid_has_a_baseline_first_and_stable_distinct_hashes(tmp_path):
    config = load_config(write(tmp_path / "c.yaml", {**BASE, "pruners": [
        {"name": "uniform", "keep": [0.5, 4]}, {"name": "random", "keep": 0.25, "site": ["pre_llm", "layer"],
                                                "layer": [1, 2]}]}))
    task = load_task(TaskSpec(synthetic="shapes", size=4), write_shapes_task(tmp_path / "t", 4))
    cells = expand(config, [task])
    labels = [c.label for c in cells]
    assert labels == ["tiny-llava | shapes-4 | unpruned", "tiny-llava | shapes-4 | uniform keep=0.5",
                      "tiny-llava | shapes-4 | uniform keep=4", "tiny-llava | shapes-4 | random keep=0.25",
                      "tiny-llava | shapes-4 | random K=1 keep=0.25", "tiny-llava | shapes-4 | random K=2 keep=0.25"]
    hashes = [c.hash for c in cells]
    assert len(set(hashes)) == len(hashes)
    assert hashes == [c.hash for c in expand(config, [task])]  # stable
    config.generation.max_new_tokens += 1
    assert not set(hashes) & {c.hash for c in expand(config, [task])}  # what the numbers depend on changes them


def test_a_task_runs_only_on_the_models_it_names(tmp_path):
    models = [{"tiny": "llava"}, {"tiny": "qwen2_vl"}]
    tasks = [{"synthetic": "shapes", "size": 4, "models": ["tiny-qwen2_vl"]}, {"synthetic": "shapes", "size": 3}]
    config = load_config(write(tmp_path / "c.yaml", {**BASE, "models": models, "tasks": tasks}))
    loaded = [load_task(TaskSpec(synthetic="shapes", size=n), write_shapes_task(tmp_path / f"t{n}", n)) for n in (4, 3)]
    pairs = [(c.model.name, c.task.name) for c in expand(config, loaded) if c.setting.is_baseline]
    assert pairs == [("tiny-llava", "shapes-3"), ("tiny-qwen2_vl", "shapes-4"), ("tiny-qwen2_vl", "shapes-3")]
    bad = {**BASE, "tasks": [{"synthetic": "shapes", "size": 4, "models": ["tiny-qwen"]}]}
    message = errors(write(tmp_path / "bad.yaml", bad))
    assert "tasks[0].models" in message and "tiny-qwen" in message and "bad.yaml" in message


def test_task_folder_format_and_its_errors(tmp_path):
    root = write_shapes_task(tmp_path / "shapes", 6)
    task = load_task(TaskSpec(path=str(root)), root)
    assert task.name == "shapes-6" and task.metric == "exact_match" and len(task.items) == 6
    assert all(i.category in {"colour", "shape", "count", "exist"} and "targets" in i.extra for i in task.items)
    mc = tmp_path / "mc"
    (mc / "img").mkdir(parents=True)
    (root / "images" / "0000.png").rename(mc / "img" / "a.png")
    rows = [{"images": ["img/a.png"], "question": "colour?", "choices": ["red", "blue"], "answer": "blue",
             "category": "colour", "difficulty": 3},
            {"image": "img/a.png", "question": "which?", "choices": ["x", "y", "z"], "answer": "A"}]
    (mc / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(TaskSpec(path=str(mc), limit=1), mc)
    assert task.metric == "multiple_choice" and task.items[0].answers == ["B"] and len(task.items) == 1
    assert task.items[0].extra == {"difficulty": 3}
    assert task.items[0].text(task.prompt_suffix).splitlines()[:3] == ["colour?", "A. red", "B. blue"]
    for bad, message in [({"image": "img/a.png", "question": "q"}, "needs exactly one of answer / answers"),
                         ({"image": "img/nope.png", "question": "q", "answer": "a"}, r"image file\(s\) not found"),
                         ({"image": "img/a.png", "question": "q", "answer": 3}, "answer: expected a string")]:
        (mc / "data.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(VTPruneError, match=message) as e:
            load_task(TaskSpec(path=str(mc)), mc)
        assert f"{mc / 'data.jsonl'}:2" in str(e.value)


def test_metrics():
    assert M.normalize("  The Two. \nsecond line") == "2"
    assert M.exact_match("Red!", ["red"]) == 1.0 and M.exact_match("red circle", ["red"]) == 0.0
    assert M.vqa_accuracy("two", ["2", "2", "two", "3"]) == 1.0
    assert M.vqa_accuracy("3", ["2", "2", "two", "3"]) == pytest.approx(1 / 3)
    assert M.vqa_accuracy("yes", ["yes"]) == 1.0
    choices = ["red", "blue", "green"]
    for prediction, letter in [("B", "B"), ("(b)", "B"), ("B. blue", "B"), ("blue", "B"), ("it is green", "C"),
                               ("a red or blue", None), ("D", None)]:
        assert M.choice_letter(prediction, choices) == letter, prediction
    result = M.aggregate([1.0, 0.0, 1.0], ["a", "b", None], [["t"], [], ["t"]])
    assert result == {"score": 2 / 3, "n": 3,
                      "per_category": {"a": {"score": 1.0, "n": 1}, "b": {"score": 0.0, "n": 1}},
                      "per_tag": {"t": {"score": 1.0, "n": 2}}}
