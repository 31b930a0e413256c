"""The video testbed as harness tasks (issue 18): task folders with videos (format, named errors, digest), the
exported held-out video questions (rows, tags, priorities, lossless frames, determinism, hash check), prompts and
processor inputs equal to eval/testbed/evaluate.py's, the informed reference on video tokens, the video configs,
and a sweep on a tiny video checkpoint built by the training pipeline's ``init_model``."""

from __future__ import annotations

import gzip
import json
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from eval.testbed.evaluate import default_checkpoint, model_inputs
from eval.testbed.train import torch_settings
from eval.testbed.train_video import init_model
from vtprune.errors import VTPruneError
from vtprune.harness.cells import settings_of
from vtprune.harness.leaderboard import REFERENCE_PRUNERS
from vtprune.harness.local import LocalEvaluator
from vtprune.harness.runner import run_sweep
from vtprune.harness.schema import ConfigError, GenerationSpec, MeasureSpec, ModelSpec, TaskSpec, load_config
from vtprune.harness.store import read_records
from vtprune.harness.tasks import load_task
from vtprune.methods.informed import InformedPruner
from vtprune.methods.random import RandomPruner
from vtprune.registry import list_pruners, make_config, pruner_aliases, pruner_class
from vtprune.testbed.dataset import IntegrityError
from vtprune.testbed.export import TEMPORAL_CATEGORIES, TESTBEDS, VIDEO_TESTBED, write_task
from vtprune.testbed.model import build_processor, load_checkpoint, video_prompt
from vtprune.testbed.video import (VIDEO_CATEGORIES, VIDEO_HELDOUT_FILE, VIDEO_SIZE, VIDEO_WORDS, load_video_set,
                                   video_token_priorities)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
N = len(VIDEO_CATEGORIES)  # questions exported here: one per category
VIDEO_MODEL = "testbed-qwen2_vl_video"
KEEPS = [0.05, 0.11, 0.25, 0.5]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task(tmp_path_factory.mktemp("video") / "task", VIDEO_TESTBED, N)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained video testbed from the training pipeline's ``init_model``, saved as a checkpoint."""
    path = tmp_path_factory.mktemp("checkpoint")
    with torch_settings(1):
        model, processor = init_model(0, None, "tiny")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rows(folder: Path) -> list[dict]:
    return _rows_of(folder / "data.jsonl")


def _task(folder: Path, **kw: typing.Any):
    return load_task(TaskSpec(path=str(folder), **kw), folder)


# ------------------------------------------------------------------------------------------ task folders


def test_video_lines_load_and_bad_ones_are_named(tmp_path):
    frames = tmp_path / "videos" / "0"
    frames.mkdir(parents=True)
    for f in range(4):
        Image.new("RGB", (32, 32), (f * 60, 0, 0)).save(frames / f"{f}.png")
    Image.new("RGB", (48, 32)).save(tmp_path / "videos" / "wide.png")
    (tmp_path / "videos" / "text.png").write_text("not a png")
    video = [f"videos/0/{f}.png" for f in range(4)]
    good = [{"video": video, "question": "q", "answer": "a", "answer_frames": [1]},
            {"image": "videos/wide.png", "video": video[:2], "question": "q", "answer": "a"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    task = _task(tmp_path)
    assert task.items[0].video == [(tmp_path / p).resolve() for p in video] and task.items[0].images == []
    assert task.items[0].extra == {"answer_frames": [1]}  # a carried field, not a known one
    assert len(task.items[1].images) == 1 and len(task.items[1].video) == 2
    for bad, message in [
            ({"video": [], "question": "q", "answer": "a"}, "video: expected a non-empty list of frame paths"),
            ({"video": "videos/0/0.png", "question": "q", "answer": "a"}, "video: expected a non-empty list"),
            ({"video": ["videos/0/0.png", 3], "question": "q", "answer": "a"}, "video: expected a non-empty list"),
            ({"video": [video[0], "videos/0/9.png"], "question": "q", "answer": "a"},
             r"video frame file\(s\) not found: \[.*9\.png'\]"),
            ({"video": [video[0], "videos/wide.png"], "question": "q", "answer": "a"},
             "video frames must share one size: the first is 32x32, but .*wide.png is 48x32"),
            ({"video": [video[0], "videos/text.png"], "question": "q", "answer": "a"}, "text.png is not a readable"),
            ({"question": "q", "answer": "a"}, r"needs image \(a path\) or images \(a list\), not both, and/or video"),
            ({"image": video[0], "images": [video[1]], "question": "q", "answer": "a"}, "images .a list., not both")]:
        (tmp_path / "data.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(VTPruneError, match=message) as e:
            _task(tmp_path)
        assert f"{tmp_path / 'data.jsonl'}:2" in str(e.value)


def test_the_digest_covers_every_frame(tmp_path, exported):
    folder = shutil.copytree(exported, tmp_path / "copy")
    digest = _task(folder).digest
    assert digest == _task(exported).digest  # the folder's content, not its place
    frame = folder / _rows(folder)[3]["video"][5]
    pixels = np.asarray(Image.open(frame)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(frame)
    assert _task(folder).digest != digest


# -------------------------------------------------------------------------------------------- the export


def test_exported_rows_match_the_held_out_videos(exported):
    rows = _rows(exported)
    items = load_video_set(VIDEO_HELDOUT_FILE, N)
    assert [r["category"] for r in rows] == list(VIDEO_CATEGORIES)  # categories take turns
    for row, item in zip(rows, items):
        q = item.question
        assert (row["id"], row["question"], row["answer"], row["targets"], row["answer_frames"]) == \
            (item.id, q.text, q.answer, list(q.targets), list(q.frames))
        assert ("temporal" in row["tags"]) == (q.category in TEMPORAL_CATEGORIES)
        assert ("retrieval" in row["tags"]) == (q.category != "counting")
        assert ("small_target" in row["tags"]) == item.small_target
        assert row["token_priority"] == video_token_priorities(item)
        assert len(row["token_priority"]["question"]) == 4 * 64
        frames = np.stack([np.asarray(Image.open(exported / p)) for p in row["video"]])
        assert np.array_equal(frames, item.video.array(VIDEO_SIZE))  # lossless PNG frames, in order
    assert write_task(exported, VIDEO_TESTBED, N) == exported  # an existing folder is kept


def test_export_is_deterministic_and_the_hash_check_refuses_a_tampered_video(tmp_path, exported):
    again = write_task(tmp_path / "again", VIDEO_TESTBED, N)
    assert (again / "data.jsonl").read_bytes() == (exported / "data.jsonl").read_bytes()
    assert _task(again).digest == _task(exported).digest
    doc = json.loads(gzip.decompress(VIDEO_HELDOUT_FILE.read_bytes()))
    doc["items"] = doc["items"][:2]
    doc["items"][1]["video"]["scene"]["background"]["noise_seed"] += 1  # other frames, same stored hash
    source = tmp_path / "tampered.json.gz"
    source.write_bytes(gzip.compress(json.dumps(doc).encode()))
    with pytest.raises(IntegrityError, match="do not match the stored SHA-256"):
        write_task(tmp_path / "tampered", VIDEO_TESTBED, 2, source=source)
    assert not (tmp_path / "tampered").exists() and not list(tmp_path.glob(".tampered*"))


def test_the_schema_knows_every_testbed():
    assert typing.get_args(typing.get_args(TaskSpec.model_fields["testbed"].annotation)[0]) == TESTBEDS
    assert TaskSpec(testbed=VIDEO_TESTBED, size=36).name == "testbed-qwen2_vl_video-36"
    with pytest.raises(ValueError, match="family"):
        write_task(Path("/nonexistent"), "qwen2_vl_audio", 2)


# ------------------------------------------------------------------------------------- prompts and inputs


def test_harness_inputs_equal_the_evaluation_scripts(checkpoint, exported):
    """The harness's chat prompt and frames give evaluate.py's input ids (per row, unpadded) and exactly its
    pixel_values_videos; frames in another order do not (negative control)."""
    model, processor = load_checkpoint(checkpoint)
    spec = ModelSpec(name=VIDEO_MODEL, path=str(checkpoint))
    evaluator = LocalEvaluator(model, processor, spec, GenerationSpec(max_new_tokens=1))
    task = load_task(TaskSpec(testbed=VIDEO_TESTBED, size=N), exported)
    ours = evaluator.encode(task.items, task)
    ref = model_inputs(processor, "qwen2_vl", load_video_set(VIDEO_HELDOUT_FILE, N))
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    assert ours["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist() == [[4, 16, 16]] * N
    assert "pixel_values" not in ours
    for row in range(N):
        mine = ours["input_ids"][row][ours["attention_mask"][row].bool()]
        theirs = ref["input_ids"][row][ref["attention_mask"][row].bool()]
        assert mine.tolist() == theirs.tolist()
    assert evaluator.prompt(task.items[0], task).split() == video_prompt(task.items[0].question).split()
    task.items[0].video.reverse()
    assert not torch.equal(evaluator.encode(task.items[:1], task)["pixel_values_videos"],
                           ref["pixel_values_videos"][:1024])


def test_the_testbed_chat_template_renders_a_video():
    processor = build_processor("qwen2_vl", VIDEO_WORDS)
    turn = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "which way ?"}]}]
    assert processor.apply_chat_template(turn, add_generation_prompt=True).split() == \
        video_prompt("which way ?").split()


def test_the_shipped_video_checkpoint_prompts_videos():
    """The trained checkpoint's saved chat template renders a video entry (skipped until it is trained)."""
    path = default_checkpoint("qwen2_vl", video=True)
    if not (path / "model.safetensors").exists():
        pytest.skip(f"no shipped video checkpoint at {path}")
    processor = load_checkpoint(path)[1]
    turn = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "which way ?"}]}]
    assert "<|video_pad|>" in processor.apply_chat_template(turn, add_generation_prompt=True)


def _kept(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[list[int]]:
    """The token indices every ``cls.select`` call keeps, appended as they come."""
    kept: list[list[int]] = []
    select = cls.select

    def recorded(self, view, k):
        selection = select(self, view, k)
        kept.append(selection.indices.tolist())
        return selection

    monkeypatch.setattr(cls, "select", recorded)
    return kept


def test_the_informed_reference_keeps_the_targets_video_tokens(checkpoint, exported, monkeypatch):
    """Through the harness's hints: at k = the number of target tokens, ``informed`` keeps exactly the tokens that
    cover the question's targets in its answer frames; ``random`` at the same k does not (negative control)."""
    model, processor = load_checkpoint(checkpoint)
    evaluator = LocalEvaluator(model, processor, ModelSpec(path=str(checkpoint)), GenerationSpec(max_new_tokens=1))
    task = load_task(TaskSpec(testbed=VIDEO_TESTBED, size=N), exported)
    seen = _kept(monkeypatch, InformedPruner)
    checked = 0
    for i, item in enumerate(task.items):
        targets = [t for t, p in enumerate(item.extra["token_priority"]["question"]) if p == 2]
        if not targets:  # "how many objects move ?" -> zero: nothing to keep first
            continue
        seen.clear()
        evaluator.run(task, [[i]], make_config("informed", keep=len(targets)), MeasureSpec(memory=False))
        assert seen and all(kept == targets for kept in seen)
        assert {t // 64 for t in targets} <= {f // 2 for f in item.extra["answer_frames"]}  # 64 tokens a group
        checked += 1
    assert checked >= N - 1
    picked = _kept(monkeypatch, RandomPruner)
    targets = [t for t, p in enumerate(task.items[0].extra["token_priority"]["question"]) if p == 2]
    evaluator.run(task, [[0]], make_config("random", keep=len(targets)), MeasureSpec(memory=False))
    assert picked and picked[0] != targets


# ----------------------------------------------------------------------------------------------- sweeps


def test_a_video_sweep_runs_end_to_end(checkpoint, tmp_path):
    config = {"name": "video_cells", "models": [{"name": VIDEO_MODEL, "path": str(checkpoint), "batch_size": 4}],
              "tasks": [{"testbed": VIDEO_TESTBED, "size": N, "models": [VIDEO_MODEL],
                         "pruners": [{"name": "dycoke", "keep": 0.25},
                                     {"name": "informed", "keep": 0.25, "label": "[ref] informed"}]}],
              "generation": {"max_new_tokens": 1}, "measure": {"threads": 1, "memory": False}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    run = run_sweep(load_config(path, output=tmp_path / "out"), progress=False)
    assert run.counts == {"ok": 3, "error": 0}
    records = {r["method"]: r for r in read_records(tmp_path / "out" / "results.jsonl")}
    assert set(records) == {"unpruned", "dycoke", "[ref] informed"}
    for r in records.values():
        assert r["visual_tokens"]["visual_before"] == 256
        assert set(r["metrics"]["per_category"]) == set(VIDEO_CATEGORIES)
        assert {"temporal", "retrieval"} <= set(r["metrics"]["per_tag"])
        assert r["metrics"]["per_tag"]["temporal"]["n"] == len(TEMPORAL_CATEGORIES)
    assert records["[ref] informed"]["visual_tokens"]["visual_after"] == 64
    assert records["unpruned"]["visual_tokens"]["visual_after"] == 256
    rows = _rows_of(tmp_path / "out" / records["dycoke"]["predictions"])
    items = load_video_set(VIDEO_HELDOUT_FILE, N)
    assert [r["answer_frames"] for r in rows] == [list(it.question.frames) for it in items]


def test_task_level_pruners_are_validated_where_they_stand(checkpoint, tmp_path):
    config = {"models": [{"name": VIDEO_MODEL, "path": str(checkpoint)}],
              "tasks": [{"testbed": VIDEO_TESTBED, "size": 2, "pruners": [{"name": "dycoke", "keep": 0.25},
                                                                          {"name": "dycokee", "keep": 0.25},
                                                                          {"name": "dycoke", "keep": 0.25,
                                                                           "site": "layer"}]}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "tasks[0].pruners[1].name" in str(e.value) and "tasks[0].pruners[2].site" in str(e.value)
    assert "tasks[0].pruners[0]" not in str(e.value)


def _with_models(config: Path, tmp_path: Path, paths: dict[str, Path]) -> Path:
    """A copy of a shipped config with testbed/models.yaml inlined and the models named in ``paths`` pointed at
    other checkpoints (e.g. the video testbed while it is being trained)."""
    data = yaml.safe_load(config.read_text())
    models = yaml.safe_load((config.parent / data.pop("include")).read_text())
    for m in models["models"]:
        m["path"] = str(paths.get(m["name"], (config.parent / "testbed" / m["path"]).resolve()))
    data.update(models)
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(data))
    return path


def test_video_full_covers_every_pruner_at_every_budget(checkpoint, tmp_path):
    """Every registered pruner at least once at each of the four budgets, at a site it supports; the video variants
    (both sites, compact positions, per-frame budgets, merging) and both informed references; no duplicate cell."""
    video = default_checkpoint("qwen2_vl", video=True)
    if not video.is_dir():
        with pytest.raises(ConfigError, match=str(video)):
            load_config(CONFIGS / "video_full.yaml")
    config = load_config(_with_models(CONFIGS / "video_full.yaml", tmp_path, {VIDEO_MODEL: checkpoint}))
    (task,) = config.tasks
    assert (task.testbed, task.models, task.pruners) == (VIDEO_TESTBED, [VIDEO_MODEL], None)
    assert task.size >= 600 and task.size % len(VIDEO_CATEGORIES) == 0
    settings = [s for p in config.pruners for s in settings_of(p)]
    names = {pruner_aliases().get(s.pruner, s.pruner) for s in settings}
    assert names == set(list_pruners())
    for name in names:
        mine = [s for s in settings if pruner_aliases().get(s.pruner, s.pruner) == name]
        assert {s.site for s in mine} <= set(pruner_class(name).sites), name
        assert sorted({s.keep for s in mine}) == KEEPS, name
        assert all(s.layer == 2 for s in mine if s.site == "layer" and name not in ("pyramiddrop", "sparsevlm")), name
    both = {s.pruner for s in settings if s.site == "layer"} & {s.pruner for s in settings if s.site == "pre_llm"}
    assert {"random", "divprune"} <= both
    assert {s.pruner for s in settings if s.positions == "compact"} >= {"random", "dycoke"}
    assert len({s.pruner for s in settings if dict(s.options).get("per_frame")}) >= 2
    assert {s.pruner for s in settings if dict(s.options).get("merge") == "proportional"}
    options = [dict(s.options) for s in settings]
    assert {o.get("key", "token_priority.question") for o, s in zip(options, settings) if s.pruner == "informed"} == \
        {"token_priority.question", "token_priority.objects"}
    assert len(settings) == len({(s.pruner, s.keep, s.site, s.layer, s.positions, s.options) for s in settings})
    assert len(settings) == 112  # the header's cell count (+ the unpruned baseline)


def test_testbed_configs_pair_each_task_with_its_own_model():
    """Every task of a config that includes the testbed models names its model, the one of its testbed, so an image
    task never runs on the video model (a task without ``models`` would run on all of them)."""
    def mismatches(config: dict) -> list[dict]:
        return [t for t in config["tasks"]
                if not t.get("models") or ("testbed" in t and t["models"] != [f"testbed-{t['testbed']}"])]

    shipped = [yaml.safe_load(p.read_text()) for p in sorted(CONFIGS.glob("*.yaml"))]
    shipped = [c for c in shipped if c.get("include") == "testbed/models.yaml"]
    assert len(shipped) >= 3 and all(not mismatches(c) for c in shipped)
    assert any(t.get("testbed") == VIDEO_TESTBED for c in shipped for t in c["tasks"])
    assert mismatches({"tasks": [{"testbed": "qwen2_vl", "size": 4}]})  # negative controls
    assert mismatches({"tasks": [{"testbed": "qwen2_vl", "models": [VIDEO_MODEL]}]})
