"""The in-LLM site (FastV/DART style): layers < K see the whole prompt; layer K selects visual tokens from
its input hidden states, and every layer >= K runs on the kept tokens (prefill) or attends only to them
(decode), with rotary cos/sin, position ids and attention masks gathered to match.

A multi-stage schedule (``config.schedule``, PyramidDrop style) cuts again at later layers: each cut selects among
the visual tokens still present, so layer group ``[b_s, b_{s+1})`` runs on fewer tokens than the one before it and
caches fewer slots; the cache's :class:`~vtprune.sites.continuation.Ledger` keeps one slot -> conversation map per
group, so decode steps and later turns continue every group exactly.

With ``merge="proportional"`` each cut merges the visual tokens it drops into kept ones (:mod:`vtprune.merge`) and
every layer >= K adds its group's ``log size`` key bias to the attention mask; layers < K are untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import VTPruneError
from ..merge import biased_mask, check_merge_support
from ..plan import KeepPlan
from ..view import ImageLayout, Segment
from .base import ImageCall, Site, restrict_extras
from .continuation import Ledger, attach, ledger_of

#: a schedule as validated: ((layer, keep), ...)
Schedule = tuple[tuple[int, "float | int"], ...]


@dataclass
class _Stage:
    """One cut: its decoder layer, the pruner that selects there (its config's ``keep`` is the cut's budget, counted
    on each image's full V) and the signals that capture layer-1's attention inputs for it."""

    layer: int
    pruner: Any
    signals: Any


@dataclass
class _InFlight:
    """What layers >= K need about the forward in flight. cols: slot -> conversation index of the current layer
    group's keys, up to ``cols.full_len``; extra: key columns beyond it in this call's masks; rows: the plan of
    this call's own tokens once the cuts so far pruned them; call: a call with images (cuts pending); calls: per
    cut, that call with its layer group's cache slots as base; groups: a continuation's (cols, masks) per cut."""

    static: bool
    cols: KeepPlan | None = None
    extra: int = 0
    rows: KeepPlan | None = None
    call: ImageCall | None = None
    calls: list[ImageCall] = field(default_factory=list)
    #: rows after each cut made so far (``None``: nothing pruned yet)
    stage_rows: list[KeepPlan | None] = field(default_factory=list)
    groups: list[tuple[KeepPlan, dict[str, Any] | None, Any]] = field(default_factory=list)
    #: the first decoder layer of the current group (static caches size their masks on it)
    layer: int = 0
    #: the language model got per-layer-type masks (a dict); masks: the family's rebuilt masks of the current
    #: group for the kept tokens (``ModelAdapter.lm_masks``), by mask key
    dict_masks: bool = False
    masks: dict[str, Any] | None = None
    #: ``config.compact_stages``: the current group's positions [b, q] and rotary (cos, sin) for this call's tokens
    pos: torch.Tensor | None = None
    pe: Any = None
    #: per call, what a layer's kwargs became once rewritten, by the identity of their sources: every layer of a
    #: group gets the same rotary tables, positions and mask objects, so each is gathered once, not per layer
    rewritten: dict[tuple, tuple[tuple, Any]] = field(default_factory=dict)

    def once(self, kind: str, fn: Callable[[], Any], *sources: Any) -> Any:
        """``fn()`` the first time ``kind`` is asked for these very ``sources`` objects in this call, then its
        result again."""
        key = (kind, *map(id, sources))
        hit = self.rewritten.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], sources)):  # ids of dead objects can be reused
            hit = self.rewritten[key] = (sources, fn())
        return hit[1]


def _hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _keep_error(keep: Any) -> str | None:
    """Why ``keep`` is not a budget (float in (0, 1] or int >= 1), or ``None``."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        return "expected a float in (0, 1] or an int >= 1"
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        return "a float keep is a fraction of the image's visual tokens and must be in (0, 1]"
    if isinstance(keep, int) and keep < 1:
        return "an int keep is a token count and must be >= 1"
    return None


def checked_schedule(schedule: Any) -> Schedule:
    """``schedule`` as a tuple of ``(layer, keep)`` pairs, or a VTPruneError naming the offending entry: layers are
    ints >= 1, strictly increasing; keeps are all fractions or all token counts, strictly decreasing."""
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, (list, tuple)) or not schedule:
        raise VTPruneError(f"schedule={schedule!r}: expected a non-empty list of (layer, keep) pairs, e.g. "
                           "[(8, 0.5), (16, 0.25), (24, 0.125)]")
    out = []
    for i, entry in enumerate(schedule):
        if isinstance(entry, (str, bytes)) or not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise VTPruneError(f"schedule[{i}]={entry!r}: expected a (layer, keep) pair")
        layer, keep = entry
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise VTPruneError(f"schedule[{i}]: layer={layer!r} must be an int >= 1")
        error = _keep_error(keep)
        if error:
            raise VTPruneError(f"schedule[{i}]: keep={keep!r}: {error}")
        if out:
            last_layer, last_keep = out[-1]
            if layer <= last_layer:
                raise VTPruneError(f"schedule[{i}]: layer {layer} after layer {last_layer}: the cut layers must "
                                   "strictly increase")
            if type(keep) is not type(last_keep):
                raise VTPruneError(f"schedule[{i}]: keep={keep!r} after keep={last_keep!r}: give every cut's keep "
                                   "as a fraction (float) or every one as a token count (int)")
            if keep >= last_keep:
                raise VTPruneError(f"schedule[{i}]: keep={keep!r} after keep={last_keep!r}: each cut keeps fewer "
                                   "visual tokens than the one before (keeps strictly decrease)")
        out.append((layer, keep))
    return tuple(out)


def _restrict(spans: Any, rows: KeepPlan) -> Any:
    """The images of a call that earlier cuts pruned by ``rows``: each image's surviving tokens as slots of the
    shortened sequence, its layout one row of them in original order (the survivors no longer tile a grid; a video
    one row per frame), and its per-token signals (vision q/k patch maps, projector inputs) restricted to the
    survivors. With ``rows.item_counts`` (each item's survivors, known on the host) nothing is read from the device
    for an image (a video's frames are still read back)."""
    slot_of = rows.slot_of()
    counts = rows.item_counts or [None] * len(spans)
    positions, layouts, extras = [], [], []
    for row, pos, ex, layout, n in zip(spans.rows, spans.positions, spans.extras, spans.layouts, counts):
        slots = slot_of[row, pos]
        kept = (slots >= 0).nonzero().flatten() if n is None else torch.nonzero_static(slots >= 0, size=n).flatten()
        positions.append(slots[kept])
        layouts.append(_survivors_layout(layout, kept))
        extras.append(restrict_extras(ex, kept, pos.numel()))
    # text tokens are never pruned, so their counts stand, and so does the text after an item with no text inside its
    # span (whose last survivor has no text before its former last token); others' is counted anew
    after = spans.text_after and [a if inside == 0 else None for a, inside in zip(spans.text_after, spans.text_inside)]
    return dataclasses.replace(spans, positions=positions, layouts=layouts, extras=extras, text_after=after)


def _survivors_layout(layout: ImageLayout, kept: torch.Tensor) -> ImageLayout:
    """The layout of an item's surviving tokens ``kept`` (sorted indices into its original tokens): one row in
    original order for an image; for a video one row per frame that still has tokens (frames renumbered densely), so
    that ``per_frame`` budgets and frame-aware methods keep seeing frames at later cuts."""
    if not layout.is_video:
        return ImageLayout((Segment(1, kept.numel()),))
    frames, counts = torch.unique_consecutive(layout.frame_index()[kept.cpu()], return_counts=True)
    dense: dict[int, int] = {}
    ids = [f if f < 0 else dense.setdefault(f, len(dense)) for f in frames.tolist()]
    if not dense:  # only tokens outside every frame survived
        return ImageLayout((Segment(1, kept.numel()),))
    return ImageLayout(tuple(Segment(1, c) for c in counts.tolist()), tuple(ids))


class LayerSite(Site):
    """Prunes from decoder layer K on (``config.layer``), and again at each later cut of ``config.schedule``."""

    name = "layer"
    title = "in-LLM"
    shortens_cache = False  # layer 0 keeps every token: transformers' cache length is the conversation's
    position_policies = ("original",)
    supports_merge = True

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.in_flight: _InFlight | None = None
        self.stages = self._build_stages()
        self._stage_at = {st.layer: i for i, st in enumerate(self.stages)}

    @classmethod
    def validate_options(cls, config: Any) -> None:
        if config.schedule is not None:
            config.schedule = checked_schedule(config.schedule)
            first_layer, first_keep = config.schedule[0]
            if config.layer is not None and config.layer != first_layer:
                raise VTPruneError(f"layer={config.layer!r} and schedule={config.schedule!r}: the first cut is at "
                                   f"layer {first_layer}; give the cut layers in the schedule only")
            default = next(f.default for f in dataclasses.fields(config) if f.name == "keep")
            given = (type(config.keep), config.keep)
            if given not in ((type(default), default), (type(first_keep), first_keep)):
                raise VTPruneError(f"keep={config.keep!r} and schedule={config.schedule!r}: the first cut keeps "
                                   f"{first_keep!r}; give the budgets in the schedule only")
            config.layer, config.keep = first_layer, first_keep
        if config.layer is None:
            config.layer = 2
        if isinstance(config.layer, bool) or not isinstance(config.layer, int) or config.layer < 1:
            raise VTPruneError(f"layer={config.layer!r}: in-LLM pruning needs an int layer K >= 1 "
                               "(use site='pre_llm' to prune before the first layer)")
        if config.positions not in cls.position_policies:
            raise VTPruneError("positions='compact' is only supported with site='pre_llm': after an in-LLM prune "
                               "the layers before K have cached the original positions, so decoding could not "
                               "continue consistently")

    @classmethod
    def check(cls, config: Any, adapter: Any) -> None:
        if config.merge != "none":
            check_merge_support(adapter)
        n = adapter.num_layers
        if config.schedule is None:
            default = config.default_schedule(n, cls._allowed_layers(config, adapter))
            if default is not None:  # the pruner's own schedule for this depth: complete the installed config
                default = checked_schedule(default)
                for name, value in (("schedule", default), ("layer", default[0][0]), ("keep", default[0][1])):
                    object.__setattr__(config, name, value)
        if config.compact_stages and not cls._renumbers(adapter):
            raise VTPruneError(f"pruner {config.name!r} with mode='reference' renumbers each layer group's positions "
                               "as the LLaVA reference code does, which needs a decoder with one 1-D rotary table, full "
                               "attention everywhere and no recurrent layers (not this model's); use mode='clean'")
        for i, (layer, _) in enumerate(config.schedule or ((config.layer, config.keep),)):
            if not 1 <= layer < n:
                where = f"schedule[{i}]: layer" if config.schedule is not None else "layer"
                raise VTPruneError(f"{where}={layer} is out of range: this model has {n} decoder layers, so K must "
                                   f"be in [1, {n - 1}]")

    @staticmethod
    def _renumbers(adapter: Any) -> bool:
        """Whether per-group renumbering (``config.compact_stages``) is exact on this model: 1-D positions, one rotary
        table (``language_model.rotary_emb``), no sliding windows or per-layer-type masks, no recurrent layers."""
        n = adapter.num_layers
        return (adapter.position_axes == 1 and callable(getattr(adapter.language_model, "rotary_emb", None))
                and not adapter.recurrent_layers and all(adapter.llm_window(i) is None for i in range(n))
                and all(adapter.mask_key(i) == "full_attention" for i in range(n)))

    def _renumbered(self, embeds: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(pos, rotary cos/sin)`` of a layer group's renumbered positions ``pos`` [b, q]."""
        return pos, self.engine.adapter.language_model.rotary_emb(embeds, pos)

    @staticmethod
    def _allowed_layers(config: Any, adapter: Any) -> list[int]:
        """The layers K the family lets this config cut at (``ModelAdapter.check_site``) whose attention its cuts read:
        layer K's own, or layer K-1's (``config.cut_reads_previous_layer``); never a linear-attention layer's."""
        read = 1 if config.cut_reads_previous_layer else 0
        allowed = []
        for layer in range(1, adapter.num_layers):
            if layer - read in adapter.recurrent_layers:
                continue
            try:
                adapter.check_site(dataclasses.replace(config, layer=layer), frozenset())
            except VTPruneError:
                continue
            allowed.append(layer)
        return allowed

    def _build_stages(self) -> list[_Stage]:
        """The cuts: the engine's pruner and signals at the first; at each later one a pruner of the same config with
        that cut's layer and keep, and its own capture of layer-1's attention inputs when the pruner reads them."""
        engine, config = self.engine, self.engine.config
        stages = [_Stage(config.layer, engine.pruner, engine.signals)]
        needs = frozenset(engine.pruner.needs)
        for layer, keep in (config.schedule or ())[1:]:
            stage_config = dataclasses.replace(config, layer=layer, keep=keep, schedule=None)
            engine.adapter.check_site(stage_config, needs)
            stages.append(_Stage(layer, type(engine.pruner)(stage_config), engine.signals.for_cut(stage_config)))
        for stage in stages:
            stage.signals.check_cut(stage.layer)
        return stages

    def install(self) -> None:
        adapter = self.engine.adapter
        for st in self.stages[1:]:
            st.signals.install(self.engine.hook_pre)
        for i in range(self.stages[0].layer, adapter.num_layers):
            self.engine.hook_pre(adapter.layers[i], self._make_layer_pre(i))
        rows = lambda: None if self.in_flight is None else self.in_flight.rows
        for handle in adapter.follow_layer_plan(self.stages[0].layer, rows):
            self.engine.track(handle)

    def reset(self) -> None:
        self.in_flight = None
        for st in self.stages[1:]:
            st.signals.end_prefill()

    def _check_ledger(self, ledger: Ledger) -> None:
        """Refuse a cache whose layer groups another schedule made (its slots would be read by the wrong layers)."""
        theirs = tuple(layer for layer, _, _ in ledger.later)
        ours = tuple(st.layer for st in self.stages[1:])
        if theirs != ours:
            raise VTPruneError(f"this cache was pruned with later in-LLM cuts at layers {list(theirs)}, this handle "
                               f"cuts at {list(ours)}: continue a pruned cache with the schedule that wrote it")

    def images(self, kwargs: dict[str, Any], call: ImageCall) -> None:
        if call.base is not None and self.engine.config.compact_stages:
            raise VTPruneError(f"pruner {self.engine.config.name!r} with mode='reference' renumbers each layer group's "
                               "cached tokens, so a later turn cannot bring a new image into that cache; use "
                               "mode='clean'")
        ledger = ledger_of(kwargs.get("past_key_values")) if call.base is not None else None
        calls = [call] * len(self.stages)
        if ledger is not None:  # a later turn: each layer group continues its own cached slots
            self._check_ledger(ledger)
            t = call.base.full_len - ledger.plan.full_len
            calls = [dataclasses.replace(call, base=g.plan.extend(t), base_real=g.physical_mask(t).bool())
                     for g in map(ledger.group, range(len(self.stages)))]
        self._read_sizes(call)
        base = None if call.base is None or call.base.is_identity else call.base  # unpruned: nothing to gather
        self.in_flight = _InFlight(static=call.static, cols=base, extra=call.embeds.shape[1], call=call, calls=calls,
                                   layer=self.stages[0].layer,
                                   dict_masks=isinstance(kwargs.get("attention_mask"), dict))
        for st in self.stages[1:]:
            st.signals.begin_prefill()

    def _read_sizes(self, call: ImageCall) -> None:
        """Read, in one go before decoder layer 0 is queued (nothing in flight yet), each row's text-token count and,
        for pruners that read decoder q/k, the text tokens after each item: the cuts then size their index tensors
        and keep plans from these, and read nothing while earlier layers are still running on a GPU."""
        spans, real = call.spans, call.real
        up_to = (real & ~spans.image_mask(real.shape)).cumsum(1)  # [b, L] text tokens up to each position
        parts = [up_to.select(1, -1)]
        if self.engine.signals.reads_decoder_qk:  # and up to each item's last and first token
            parts += [up_to[row, pos.amax(0, keepdim=True)] for row, pos in zip(spans.rows, spans.positions)]
            parts += [up_to[row, pos.amin(0, keepdim=True)] for row, pos in zip(spans.rows, spans.positions)]
        sizes = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()
        b, n = real.shape[0], len(spans)
        spans.text_counts = sizes[:b]
        last, first = sizes[b:b + n], sizes[b + n:]
        spans.text_after = [spans.text_counts[row] - t for row, t in zip(spans.rows, last)] or None
        spans.text_inside = [t - f for t, f in zip(last, first)] or None

    def continuation(self, kwargs: dict[str, Any], ledger: Ledger, past: int, q: int, static: bool) -> None:
        self._check_ledger(ledger)
        groups = []
        for i, st in enumerate(self.stages):
            group = ledger.group(i)
            masks = None
            if isinstance(kwargs.get("attention_mask"), dict):  # built on layer 0's (full-length) cache: rebuild
                masks = self.engine.family_masks(kwargs["inputs_embeds"], self._cache_padding(group, past, q),
                                                 kwargs.get("past_key_values"), st.layer)
            renumbered = None
            if self.engine.config.compact_stages and not group.plan.is_identity:  # from its own real cache length
                appended = ledger.appended(past, False)
                start = group.real.sum(1, keepdim=True) + appended
                renumbered = self._renumbered(kwargs["inputs_embeds"], start + torch.arange(q, device=start.device))
            groups.append((group.plan, masks, renumbered))
        self.in_flight = _InFlight(static=static, cols=groups[0][0], extra=ledger.appended(past, False) + q,
                                   masks=groups[0][1], groups=groups, layer=self.stages[0].layer)
        self.in_flight.pos, self.in_flight.pe = groups[0][2] or (None, None)

    def _cache_padding(self, ledger: Ledger, past: int, q: int) -> torch.Tensor:
        """[b, slots + appended + q] 2-D padding mask over the pruned layers' cache and this call's tokens: the
        backbone's 2-D mask (over the conversation) gathered to the pruned slots, or the ledger's own."""
        mask = self.engine.backbone_mask
        appended = ledger.appended(past, False)
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[-1] == ledger.plan.full_len + appended + q:
            return ledger.plan.gather_2d_mask(mask)
        return ledger.physical_mask(appended + q)

    # ---- decoder-layer hooks ------------------------------------------------------------------------
    def _make_layer_pre(self, index: int):
        recurrent = index in self.engine.adapter.recurrent_layers
        stage = self._stage_at.get(index)

        def hook(module, args, kwargs):
            state = self.in_flight
            if state is None:
                return None
            if stage is not None and state.call is not None:
                args, kwargs = self._cut(args, kwargs, state, stage)
            elif stage is not None and state.groups:  # a continuation enters the next layer group
                state.cols, state.masks, renumbered = state.groups[stage]
                state.pos, state.pe = renumbered or (None, None)
                state.layer = index
            if state.cols is not None:
                if state.masks is not None:  # the family's masks, rebuilt for the kept tokens
                    kwargs["attention_mask"] = state.masks[self.engine.adapter.mask_key(index)]
                self._gather_layer_kwargs(kwargs, state, recurrent)
                if state.cols.bias is not None:
                    self._bias(_hidden(args, kwargs), kwargs, state)
            if state.pe is not None:  # config.compact_stages: the group's own numbering
                kwargs["position_embeddings"] = state.pe
                if torch.is_tensor(kwargs.get("position_ids")):
                    kwargs["position_ids"] = state.pos
            return args, kwargs
        return hook

    def _cut(self, args: tuple, kwargs: dict[str, Any], state: _InFlight, index: int):
        """Cut ``index`` of a call with images: select among the visual tokens still present, then shorten this
        call's tokens from here on and enter the cut's layer group."""
        engine, stage, call = self.engine, self.stages[index], state.call
        hidden = _hidden(args, kwargs)
        prev = state.rows
        spans, real = (call.spans, call.real) if prev is None else (_restrict(call.spans, prev), call.kept_real(prev))
        pe = kwargs.get("position_embeddings") if state.pe is None else state.pe
        if pe is not None and prev is not None and state.pe is None:  # the layer's gather runs after the cut
            pe = tuple(prev.gather(t, seq_dim=-2, batch_dim=0) for t in pe)
        stage.signals.add_layer_qk(stage.layer, hidden, pe, spans, real)
        stage.signals.add_llm_extras(spans, real)
        counts = None
        if index > 0:
            stage.signals.end_prefill()
            counts = [stage.pruner.count(layout) for layout in call.spans.layouts]
        prior = None if prev is None or prev.bias is None else prev.bias.exp().round()  # sizes merged so far
        try:
            plan = engine.select(hidden, spans, real, stage=index, pruner=stage.pruner, counts=counts, prior=prior)
        except Exception:  # a broken selection whose check was deferred may be what failed: name it first
            engine.check_selections()
            raise
        if not plan.is_identity:
            state.rows = plan if prev is None else prev.then(plan)
            engine.recorder.real = call.kept_real(state.rows).sum(1)
            engine.prune_labels(plan)
            hidden = plan.apply_states(hidden)
        state.stage_rows.append(state.rows)
        self._enter(state, index, hidden, kwargs.get("past_key_values"))
        if state.rows is not None and kwargs.get("past_key_values") is not None:
            attach(kwargs["past_key_values"], self._ledger(state))
        if plan.is_identity:
            return args, kwargs
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _enter(self, state: _InFlight, index: int, hidden: torch.Tensor, cache: Any) -> None:
        """Point the layers of cut ``index``'s group at their keys: the group's cached slots and this call's tokens
        kept so far (masks rebuilt where the family builds per-layer-type ones)."""
        call, rows, layer = state.calls[index], state.rows, self.stages[index].layer
        state.layer = layer
        if self.engine.config.compact_stages and rows is not None:  # prefills only (no new image joins such a cache)
            rank = (call.kept_real(rows).long().cumsum(1) - 1).clamp(min=0)
            state.pos, state.pe = self._renumbered(hidden, rank)
        if rows is None:  # nothing of this call pruned yet: its cache slots only, original numbering
            state.cols = None if call.base is None or call.base.is_identity else call.base
            state.extra = call.embeds.shape[1]
            return
        state.cols, state.extra = call.cols(rows), 0
        if state.dict_masks:
            state.masks = call.rebuilt_masks(self.engine, rows, hidden, cache, layer)

    def _ledger(self, state: _InFlight) -> Ledger:
        """The ledger of the cache this call writes: one slot map per layer group (cuts still ahead keep the rows
        of the cuts made so far)."""
        call = state.call
        identity = KeepPlan.identity(call.real.shape[0], call.real.shape[1], call.real.device)
        groups = []
        for i in range(len(self.stages)):
            rows = state.stage_rows[i] if i < len(state.stage_rows) else state.rows
            groups.append(state.calls[i].ledger(identity if rows is None else rows))
        later = tuple((st.layer, g.plan, g.real) for st, g in zip(self.stages[1:], groups[1:]))
        return dataclasses.replace(groups[0], later=later)

    def _gather_layer_kwargs(self, kwargs: dict[str, Any], state: _InFlight, recurrent: bool = False) -> None:
        """Rotary cos/sin, text position ids and the attention mask of a layer >= K, to kept tokens. A recurrent
        layer (``ModelAdapter.recurrent_layers``) masks only this call's own tokens: its 2-D mask follows the
        call's kept tokens, and it never gets the cache's columns or a 4-D mask."""
        cols, rows = state.cols, state.rows
        if rows is not None:
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                kwargs["position_embeddings"] = state.once(
                    "pe", lambda: tuple(rows.gather(t, seq_dim=-2, batch_dim=0) for t in pe), pe, rows)
            pid = kwargs.get("position_ids")
            if torch.is_tensor(pid) and pid.shape[-1] == rows.full_len:
                kwargs["position_ids"] = state.once("pos", lambda: rows.gather(pid, seq_dim=-1, batch_dim=-2),
                                                    pid, rows)
        mask = kwargs.get("attention_mask")
        if state.masks is not None:
            return
        if recurrent:
            if rows is not None and (mask is not None or rows.has_padding_slots):
                if mask is not None and (mask.dim() != 2 or mask.shape[-1] != rows.full_len):
                    raise VTPruneError(f"unexpected mask of shape {tuple(mask.shape)} in a recurrent decoder layer: "
                                       f"expected [batch, {rows.full_len}]")
                if mask is None:  # the model assumed no padding; re-padding added some
                    mask = torch.ones(rows.valid.shape[0], rows.full_len, dtype=torch.long, device=rows.valid.device)
                kwargs["attention_mask"] = rows.gather_2d_mask(mask)
        elif mask is None:
            if cols.has_padding_slots:  # the model assumed no padding; re-padding added some
                kwargs["attention_mask"] = state.once("built", lambda: self._build_mask(kwargs, state), cols, rows)
        elif mask.dim() == 2:
            kwargs["attention_mask"] = state.once("mask2", lambda: cols.gather_2d_mask(mask), mask, cols)
        elif mask.dim() == 4:
            kwargs["attention_mask"] = state.once("mask4", lambda: cols.gather_4d_mask(mask, rows, state.static),
                                                  mask, cols, rows)
        else:
            raise VTPruneError(f"unexpected attention mask of shape {tuple(mask.shape)} in decoder layer")

    def _bias(self, hidden: torch.Tensor, kwargs: dict[str, Any], state: _InFlight) -> None:
        """Add the layer group's key bias (``merge="proportional"``: ``log size`` of its merged slots) to a layer's
        attention mask, already gathered to the group's keys (the group's slots, then ``state.extra`` columns)."""
        cols, mask = state.cols, kwargs.get("attention_mask")
        kwargs["attention_mask"] = state.once(
            "bias", lambda: biased_mask(mask, cols.bias, hidden.shape[1], cols.length + state.extra,
                                        self.engine.adapter.attn_implementation, hidden.dtype, state.static),
            mask, cols)

    def _build_mask(self, kwargs: dict[str, Any], state: _InFlight) -> torch.Tensor:
        """A mask from scratch where the model passed none (it assumed no padding; re-padding added some)."""
        cols = state.cols
        impl = self.engine.adapter.attn_implementation
        if impl.startswith("flash"):
            ones = torch.ones(cols.valid.shape[0], state.extra, dtype=torch.long, device=cols.valid.device)
            return torch.cat([cols.valid.long(), ones], 1)
        q = state.rows.length if state.rows is not None else kwargs["position_embeddings"][0].shape[-2]
        dtype = next(self.engine.adapter.language_model.parameters()).dtype
        cache = kwargs.get("past_key_values")
        # a static cache's keys span its whole length, the unused slots masked
        width = cache.get_mask_sizes(q, state.layer)[0] if state.static and cache is not None else None
        return cols.causal_mask(q, state.extra, "additive" if impl == "eager" else "bool", dtype, width)
