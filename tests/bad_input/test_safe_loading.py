"""Loading files named by users never runs their code: learned scorers load as tensors (safetensors or
``torch.load(weights_only=True)``) into a documented architecture, TorchScript only with ``trust_scorer_code``;
testbed checkpoints load from local files only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import model
from safetensors.torch import save_file
from torch import nn

import vtprune
from vtprune import VTPruneError
from vtprune.registry import build_pruner, make_config
from vtprune.view import ImageLayout, VisualView

FEATURES = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))


class Payload:
    """Unpickling this writes a file: the code execution a scorer file must never get."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _mlp_state(hidden: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"layers.0.weight": torch.randn(hidden, 8, generator=g), "layers.0.bias": torch.randn(hidden, generator=g),
            "layers.1.weight": torch.randn(1, hidden, generator=g), "layers.1.bias": torch.randn(1, generator=g)}


def _learned_top(path, k: int = 6, **options) -> list[int]:
    """The tokens ``mmr`` keeps with λ = 1 (the top-k of the learned scores) from ``path``'s scorer."""
    config = make_config("mmr", keep=k, importance="learned", scorer_path=str(path), lam=1.0, **options)
    view = VisualView(features=FEATURES, text=torch.zeros(0, 8), layout=ImageLayout.flat(30), site="pre_llm",
                      layer=None, sample=0, image=0)
    return build_pruner(config).select(view, k).indices.tolist()


def _expected_top(state: dict[str, torch.Tensor], k: int = 6) -> list[int]:
    hidden = F.gelu(FEATURES @ state["layers.0.weight"].T + state["layers.0.bias"])
    scores = (hidden @ state["layers.1.weight"].T + state["layers.1.bias"]).flatten()
    return sorted(torch.topk(scores, k).indices.tolist())


def test_pickled_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "scorer.pt"
    torch.save(Payload(str(marker)), path)
    for trust in ({}, {"trust_scorer_code": True}):
        with pytest.raises(VTPruneError, match="scorer_path"):
            vtprune.apply(model("llava").model, "mmr", importance="learned", scorer_path=str(path), **trust).remove()
        assert not marker.exists()


@pytest.mark.parametrize("fmt", ["safetensors", "state_dict"])
def test_tensor_files_load_into_the_documented_mlp(tmp_path, fmt):
    state = _mlp_state()
    path = tmp_path / f"scorer.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    assert _learned_top(path) == _expected_top(state)


def test_a_single_linear_layer_is_a_scorer(tmp_path):
    w, b = torch.randn(1, 8), torch.randn(1)
    save_file({"layers.0.weight": w, "layers.0.bias": b}, str(tmp_path / "linear.safetensors"))
    assert _learned_top(tmp_path / "linear.safetensors") == sorted(torch.topk(FEATURES @ w[0] + b, 6).indices.tolist())


def test_torchscript_needs_trust_scorer_code(tmp_path):
    torch.manual_seed(0)
    scorer = nn.Sequential(nn.Linear(8, 1), nn.Flatten(0))
    path = tmp_path / "scripted.pt"
    torch.jit.script(scorer).save(str(path))
    with pytest.raises(VTPruneError, match="trust_scorer_code=True"):
        _learned_top(path)
    with torch.no_grad():
        top = sorted(torch.topk(scorer(FEATURES), 6).indices.tolist())
    assert _learned_top(path, trust_scorer_code=True) == top


@pytest.mark.parametrize("state,match", [
    ({"0.weight": torch.randn(1, 8)}, r"unexpected tensor\(s\) \['0.weight'\]"),
    ({"layers.0.weight": torch.randn(2, 8)}, "last layer must output 1 score"),
    ({"layers.0.weight": torch.randn(4, 8), "layers.1.weight": torch.randn(1, 3)}, r"layers.1.weight.*\[out, 4\]"),
    ({"layers.0.weight": torch.randn(1, 8), "layers.0.bias": torch.randn(2)}, r"layers.0.bias.*\[1\]"),
    ({"layers.0.weight": torch.randn(1, 8), "layers.2.weight": torch.randn(1, 1)}, "layers.1.weight is missing"),
    ({"layers.0.weight": torch.randn(1, 8, 1)}, r"layers.0.weight.*\[out, in\]"),
    ({"layers.0.weight": torch.randn(1, 6)}, "expects 6 features per token, got 8"),
])
def test_a_malformed_state_dict_is_a_named_error(tmp_path, state, match):
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(VTPruneError, match=match):
        _learned_top(tmp_path / "bad.safetensors")


def test_neither_tensors_nor_torchscript_is_a_named_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a scorer")
    with pytest.raises(VTPruneError, match="scorer_path=.*notes.txt.*safetensors"):
        _learned_top(path)


def test_testbed_checkpoints_load_local_files_only(monkeypatch):
    import transformers as tf

    from vtprune.testbed import model as testbed

    calls = []

    def from_pretrained(path, **kwargs):
        calls.append(kwargs)
        return nn.Linear(1, 1)

    monkeypatch.setattr(tf.AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    monkeypatch.setattr(tf.AutoProcessor, "from_pretrained", from_pretrained)
    testbed.load_checkpoint("some/checkpoint")
    assert len(calls) == 2 and all(kw.get("local_files_only") is True for kw in calls)
