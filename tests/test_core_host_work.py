"""The engine's host work per pruned call (issue 20): a pruner's answer is checked with one host read, a keep plan
is built with one, and both still give what the slower forms gave; at the in-LLM cut the check is read after the
language model ran, and still names a broken selection."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, model

import vtprune
from vtprune.plan import KeepPlan
from vtprune.registry import _REGISTRY
from vtprune.view import Selection


@pytest.mark.parametrize("indices, n", [([2, 1], 5), ([1, 1], 5), ([0, 5], 5), ([-1, 3], 5)])
def test_unsorted_repeated_or_out_of_range_indices_are_refused(indices, n):
    with pytest.raises(RuntimeError, match="sorted, unique and within"):
        Selection(indices=torch.tensor(indices)).check(n, len(indices))


def test_a_size_below_one_is_refused_and_a_good_selection_passes():
    with pytest.raises(RuntimeError, match="one size >= 1 per kept token"):
        Selection(indices=torch.tensor([0, 4]), sizes=torch.tensor([1.0, 0.0])).check(5, 2)
    with pytest.raises(RuntimeError, match="expected exactly 3"):
        Selection(indices=torch.tensor([0, 4])).check(5, 3)
    Selection(indices=torch.tensor([0, 4]), sizes=torch.tensor([1.0, 2.0])).check(5, 2)  # negative control
    Selection(indices=torch.tensor([], dtype=torch.long)).check(5, 0)


def _reference_plan(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and valid of a keep mask, row by row: kept indices in order, left-padded with the row's first."""
    lk = int(keep.sum(1).max())
    index, valid = [], []
    for row in keep:
        kept = row.nonzero().flatten().tolist()
        pad = lk - len(kept)
        index.append([kept[0]] * pad + kept)
        valid.append([False] * pad + [True] * len(kept))
    return torch.tensor(index), torch.tensor(valid)


@pytest.mark.parametrize("uneven", [False, True])
def test_keep_plan_lists_each_rows_kept_tokens_in_order(uneven):
    g = torch.Generator().manual_seed(0)
    keep = torch.zeros(3, 12, dtype=torch.bool)
    for r, n in enumerate((5, 3, 5) if uneven else (5, 5, 5)):
        keep[r, torch.randperm(12, generator=g)[:n]] = True
    plan = KeepPlan.from_keep_mask(keep)
    index, valid = _reference_plan(keep)
    assert torch.equal(plan.index, index) and torch.equal(plan.valid, valid)
    assert plan.has_padding_slots == uneven == (not bool(plan.valid.all()))
    assert not torch.equal(plan.index, index.flip(1))  # negative control: order matters
    known = KeepPlan.from_keep_mask(keep, per_row=keep.sum(1).tolist())  # row lengths known: the same plan, no read
    assert torch.equal(known.index, index) and torch.equal(known.valid, valid)
    assert known.has_padding_slots == uneven


@pytest.mark.parametrize("uneven", [False, True])
def test_keep_plan_places_merged_states_and_sizes_in_their_slots(uneven):
    """Merged states and sizes land in the slots of their tokens (found by a scatter, padding slots aside), and
    ``merged`` given by the caller builds the same plan as the read it replaces."""
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[0, [1, 4, 6]] = True
    keep[1, [0, 2, 5] if not uneven else [2, 5]] = True
    states = [(0, torch.tensor([4, 6]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])),
              (1, torch.tensor([5]), torch.ones(1, 2))]
    sizes = [(0, torch.tensor([1, 4, 6]), torch.tensor([1.0, 3.0, 1.0])),
             (1, torch.tensor([2, 5]), torch.tensor([4.0, 2.0]))]
    read = KeepPlan.from_keep_mask(keep, states, sizes)
    told = KeepPlan.from_keep_mask(keep, states, sizes, per_row=keep.sum(1).tolist(), merged=True)
    hidden = torch.arange(2 * 8 * 2, dtype=torch.float32).view(2, 8, 2)
    for plan in (read, told):
        out = plan.apply_states(hidden)  # row 0 keeps 1, 4, 6; row 1 keeps 0, 2, 5 or (padding), 2, 5
        assert torch.equal(out[0], torch.stack([hidden[0, 1], torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]))
        assert torch.equal(out[1, 1:], torch.stack([hidden[1, 2], torch.ones(2)]))  # token 5 replaced, 2 not
        assert torch.equal(out[1, 0], hidden[1, 0] if not uneven else hidden[1, 2])  # a padding slot copies the first
        assert torch.allclose(plan.bias.exp(), torch.tensor([[1.0, 3.0, 1.0], [1.0, 4.0, 2.0]]))  # not the padding slot
    assert torch.equal(read.index, told.index) and torch.equal(read.bias, told.bias)
    assert read.has_padding_slots == told.has_padding_slots == uneven
    unmerged = KeepPlan.from_keep_mask(keep, (), [(0, torch.tensor([1]), torch.ones(1))], merged=False)
    assert unmerged.bias is None and unmerged.replace_slots is None  # all sizes 1: no bias, as the read decides


class _Broken(vtprune.Pruner):
    """Keeps the first k tokens, then breaks them the way :attr:`how` says ("fine": it does not)."""

    config_class = type("BrokenConfig", (vtprune.UniformConfig,), {"name": "_test_broken"})
    how = "fine"

    def select(self, view, k):
        idx = torch.arange(k, device=view.features.device)
        if _Broken.how == "repeated":
            idx[-1] = idx[0]
        elif _Broken.how == "out of range":
            idx[-1] = view.num_tokens
        return Selection(indices=idx)


@pytest.fixture
def broken():
    vtprune.register_pruner(_Broken)
    yield _Broken
    _Broken.how = "fine"
    del _REGISTRY["_test_broken"]


@pytest.mark.parametrize("site", ["pre_llm", "layer"])
@pytest.mark.parametrize("how", ["repeated", "out of range"])
def test_a_broken_selection_gets_the_named_error_at_either_site(broken, site, how):
    """The in-LLM cut reads no check while layers run: its checks are read once the language model ran (or when
    what the broken selection caused fails first), with the same message as at the pre-LLM site."""
    tv = model("llava_next")
    inputs = batch_inputs(tv, [0, 1])
    options = {"site": "layer", "layer": 2} if site == "layer" else {}
    with vtprune.apply(tv.model, "_test_broken", keep=0.5, **options):
        tv.model(**inputs)  # negative control: a good selection passes
        broken.how = how
        with pytest.raises(RuntimeError, match="sorted, unique and within"):
            tv.model(**inputs)
        broken.how = "fine"
        tv.model(**inputs)  # nothing of the failed call is left to raise again


@pytest.mark.parametrize("site", ["pre_llm", "layer"])
@pytest.mark.parametrize("how", ["repeated", "out of range"])
def test_a_broken_per_frame_selection_gets_the_named_error_at_either_site(broken, site, how):
    """Per-frame selection (``per_frame=True``) checks each frame's answer: at once before the LLM, after the language
    model ran at the in-LLM cut (no read while the layers run), with the same message."""
    from test_video import video_inputs
    tv = model("qwen2_vl")
    inputs = video_inputs(tv, [0, 1])
    options = {"site": "layer", "layer": 2} if site == "layer" else {}
    with vtprune.apply(tv.model, "_test_broken", keep=0.5, per_frame=True, **options):
        tv.model(**inputs)  # negative control: a good selection passes
        broken.how = how
        with pytest.raises(RuntimeError, match="sorted, unique and within"):
            tv.model(**inputs)
        broken.how = "fine"
        tv.model(**inputs)


def test_a_plan_sized_on_a_wrong_row_count_gets_a_named_error(monkeypatch):
    """The in-LLM cut sizes its keep plan from the text counts read before layer 0, without reading the mask: if
    a count were wrong the plan would silently drop or repeat tokens, so the engine checks it after the model ran."""
    from vtprune.sites.layer import LayerSite

    tv = model("llava_next")
    inputs = batch_inputs(tv, [0, 1])
    with vtprune.apply(tv.model, "random", keep=0.5, site="layer", layer=2):
        tv.model(**inputs)  # negative control: the counts read from the mask pass
        read = LayerSite._read_sizes

        def off_by_one(self, call):
            read(self, call)
            call.spans.text_counts = [n + 1 for n in call.spans.text_counts[:1]] + call.spans.text_counts[1:]

        monkeypatch.setattr(LayerSite, "_read_sizes", off_by_one)
        with pytest.raises(vtprune.VTPruneError, match=r"keep plan sized for \[\d+, \d+\] tokens per row"):
            tv.model(**inputs)


def test_a_composed_plan_knows_its_padding_only_when_its_parts_do():
    """A later cut's plan (``then``) needs no read to know whether it re-pads when both parts know they do not, or the
    inner one does; otherwise it reads as before (negative control)."""
    even = KeepPlan.from_keep_mask(torch.ones(2, 6, dtype=torch.bool).index_fill_(1, torch.tensor([1]), False))
    inner = KeepPlan.from_keep_mask(torch.ones(2, 5, dtype=torch.bool).index_fill_(1, torch.tensor([0, 3]), False))
    both = even.then(inner)
    assert "has_padding_slots" in both.__dict__ and not both.has_padding_slots
    assert torch.equal(both.index, torch.tensor([[2, 3, 5], [2, 3, 5]]))
    ragged = torch.ones(2, 5, dtype=torch.bool)
    ragged[0, 0] = False
    padded = even.then(KeepPlan.from_keep_mask(ragged))
    assert padded.__dict__["has_padding_slots"] is True and not bool(padded.valid.all())
    unknown = KeepPlan(index=even.index, valid=even.valid, full_len=6).then(inner)
    assert "has_padding_slots" not in unknown.__dict__ and not unknown.has_padding_slots
