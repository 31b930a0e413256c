"""The in-LLM site (FastV/DART style): layers < K see the whole prompt; layer K selects visual tokens from
its input hidden states, and every layer >= K runs on the kept tokens (prefill) or attends only to them
(decode), with rotary cos/sin, position ids and attention masks gathered to match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import VTPruneError
from ..plan import KeepPlan
from .base import ImageCall, Site
from .continuation import Ledger, attach


@dataclass
class _InFlight:
    """What layers >= K need about the forward in flight. cols: slot -> conversation index of the pruned
    layers' keys, up to ``cols.full_len``; extra: key columns beyond it in this call's masks; rows: the plan
    of this call's own tokens once layer K pruned them; pending: the images layer K must select from."""

    static: bool
    cols: KeepPlan | None = None
    extra: int = 0
    rows: KeepPlan | None = None
    pending: ImageCall | None = None
    #: the language model got per-layer-type masks (a dict); masks: the family's rebuilt masks of layers >= K
    #: for the kept tokens (``ModelAdapter.lm_masks``), by mask key
    dict_masks: bool = False
    masks: dict[str, Any] | None = None


def _hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class LayerSite(Site):
    """Prunes from decoder layer K on (``config.layer``)."""

    name = "layer"
    title = "in-LLM"
    shortens_cache = False  # layer 0 keeps every token: transformers' cache length is the conversation's
    position_policies = ("original",)

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.in_flight: _InFlight | None = None

    @classmethod
    def validate_options(cls, config: Any) -> None:
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
        if not 1 <= config.layer < adapter.num_layers:
            raise VTPruneError(f"layer={config.layer} is out of range: this model has {adapter.num_layers} decoder "
                               f"layers, so K must be in [1, {adapter.num_layers - 1}]")

    def install(self) -> None:
        adapter = self.engine.adapter
        for i in range(self.engine.config.layer, adapter.num_layers):
            self.engine.hook_pre(adapter.layers[i], self._make_layer_pre(i))
        rows = lambda: None if self.in_flight is None else self.in_flight.rows  # noqa: E731
        for handle in adapter.follow_layer_plan(self.engine.config.layer, rows):
            self.engine.track(handle)

    def reset(self) -> None:
        self.in_flight = None

    def images(self, kwargs: dict[str, Any], call: ImageCall) -> None:
        base = None if call.base is None or call.base.is_identity else call.base  # unpruned: nothing to gather
        self.in_flight = _InFlight(static=call.static, cols=base, extra=call.embeds.shape[1], pending=call,
                                   dict_masks=isinstance(kwargs.get("attention_mask"), dict))

    def continuation(self, kwargs: dict[str, Any], ledger: Ledger, past: int, q: int, static: bool) -> None:
        self.in_flight = _InFlight(static=static, cols=ledger.plan, extra=ledger.appended(past, False) + q)
        if isinstance(kwargs.get("attention_mask"), dict):  # built on layer 0's (full-length) cache: rebuild
            padding = self._cache_padding(ledger, past, q)
            self.in_flight.masks = self.engine.family_masks(kwargs["inputs_embeds"], padding,
                                                            kwargs.get("past_key_values"), self.engine.config.layer)

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

        def hook(module, args, kwargs):
            state = self.in_flight
            if state is None:
                return None
            if state.pending is not None and index == self.engine.config.layer:
                args, kwargs = self._select(args, kwargs, state)
            if state.cols is not None:
                if state.masks is not None:  # the family's masks, rebuilt for the kept tokens
                    kwargs["attention_mask"] = state.masks[self.engine.adapter.mask_key(index)]
                self._gather_layer_kwargs(kwargs, state, recurrent)
            return args, kwargs
        return hook

    def _select(self, args: tuple, kwargs: dict[str, Any], state: _InFlight):
        """Layer K of a call with images: select, then shorten this call's tokens from here on."""
        call, state.pending = state.pending, None
        engine = self.engine
        hidden = _hidden(args, kwargs)
        engine.signals.add_llm_extras(call.spans, call.real)
        plan = engine.select(hidden, call.spans, call.real)
        if plan.is_identity:
            return args, kwargs
        engine.recorder.real = call.kept_real(plan).sum(1)
        state.rows, state.cols, state.extra = plan, call.cols(plan), 0
        if state.dict_masks:
            state.masks = call.rebuilt_masks(engine, plan, plan.apply_states(hidden),
                                             kwargs.get("past_key_values"), engine.config.layer)
        engine.prune_labels(plan)
        cache = kwargs.get("past_key_values")
        if cache is not None:
            attach(cache, call.ledger(plan))
        if args:
            return (plan.apply_states(hidden),) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = plan.apply_states(hidden)
        return args, kwargs

    def _gather_layer_kwargs(self, kwargs: dict[str, Any], state: _InFlight, recurrent: bool = False) -> None:
        """Rotary cos/sin, text position ids and the attention mask of a layer >= K, to kept tokens. A recurrent
        layer (``ModelAdapter.recurrent_layers``) masks only this call's own tokens: its 2-D mask follows the
        call's kept tokens, and it never gets the cache's columns or a 4-D mask."""
        cols, rows = state.cols, state.rows
        if rows is not None:
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                kwargs["position_embeddings"] = tuple(rows.gather(t, seq_dim=-2, batch_dim=0) for t in pe)
            pid = kwargs.get("position_ids")
            if torch.is_tensor(pid) and pid.shape[-1] == rows.full_len:
                kwargs["position_ids"] = rows.gather(pid, seq_dim=-1, batch_dim=-2)
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
                kwargs["attention_mask"] = self._build_mask(kwargs, state)
        elif mask.dim() == 2:
            kwargs["attention_mask"] = cols.gather_2d_mask(mask)
        elif mask.dim() == 4:
            kwargs["attention_mask"] = cols.gather_4d_mask(mask, rows, state.static)
        else:
            raise VTPruneError(f"unexpected attention mask of shape {tuple(mask.shape)} in decoder layer")

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
        width = cache.get_mask_sizes(q, self.engine.config.layer)[0] if state.static and cache is not None else None
        return cols.causal_mask(q, state.extra, "additive" if impl == "eager" else "bool", dtype, width)
