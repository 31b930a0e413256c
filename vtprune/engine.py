"""The hook engine: installs forward(-pre) hooks on a stock ``transformers`` VLM and applies keep plans.

Hooks (all with kwargs, all removed by :meth:`Engine.remove`):

* top-level pre-hook: when ``labels`` are given, makes them follow the pruned sequence (see ``_labels_pre``);
* backbone pre-hook (``model.model``): remembers where the images are (it still sees ``input_ids``); on calls
  that continue a pruned cache, drops tokens the cache already holds and supplies positions in original
  coordinates when none were given;
* language-model pre-hook: pre-LLM site — selects visual tokens and gathers embeddings, mask and position
  ids; every site — turns continuation masks/positions into cache coordinates (:mod:`vtprune.continuation`);
* decoder-layer pre-hooks on layers K..T-1 (in-LLM site): layer K selects from its input hidden states;
  every layer >= K gets its rotary cos/sin, position ids and masks gathered to the kept tokens;
* a light pre-hook on every decoder layer records the sequence length it processed (``handle.stats``).

``model.generate`` is wrapped on the instance (not the class) so that one generation call is a scope:
uncached generation re-runs the growing prompt and reuses the selections made for it within that call only.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from .adapters import ImageSpans, ModelAdapter
from .config import PrunerConfig
from .continuation import Ledger, attach, cache_mask, drop_leading, is_static, ledger_of, refed_tokens
from .errors import VTPruneError
from .plan import KeepPlan
from .pruners.base import Pruner
from .signals import Signals
from .stats import StatsRecorder
from .view import Selection, VisualView


@dataclass
class _Pending:
    """Images of a call that layer K must select from: their real-token mask, where the ledger's plan
    stands before this call (``None`` for a prefill) with its real slots, and the next position after it."""

    spans: ImageSpans
    real: torch.Tensor
    next_pos: torch.Tensor
    base: KeepPlan | None = None
    base_real: torch.Tensor | None = None


@dataclass
class _Call:
    """What the decoder-layer hooks (in-LLM site) need to know about the forward in flight.

    cols: slot -> conversation index of the pruned layers' keys, up to ``cols.full_len``; extra: key columns
    beyond it in this call's masks; rows: the plan of this call's own tokens once layer K pruned them;
    pending: (images, real-token mask, ledger base) for layer K to select from; static: fixed-length cache."""

    cols: KeepPlan | None = None
    extra: int = 0
    rows: KeepPlan | None = None
    pending: _Pending | None = None
    static: bool = False


def _past_len(kwargs: dict[str, Any]) -> int:
    past = kwargs.get("past_key_values")
    return 0 if past is None else int(past.get_seq_length())


def _hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _real_tokens(mask: Any, b: int, n: int, past: int, device: torch.device) -> torch.Tensor:
    """[b, n] bool real (non-padding) tokens of a call's ``n`` tokens after ``past`` cached ones, from any mask
    form: 2-D padding masks directly; 4-D (or per-layer-type dicts of them) from the diagonal, since a
    padding query may not see its own key; none means all real."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next((m for m in mask.values() if m is not None), None))
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    if mask.dim() == 2:
        return mask[:, -n:].bool()
    rows = torch.arange(n, device=mask.device)
    diag = mask[:, 0, -n:][:, rows, rows + past]
    return diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2


def _is_packed(given: torch.Tensor | None) -> bool:
    """Padding-free packed rows: the text position ids transformers reads packing from ([b, L], or row 0 of
    Qwen's [4, b, L]) restart inside a row."""
    if given is None or (given.dim() == 3 and given.shape[0] != 4):
        return False
    text = given if given.dim() == 2 else given[0]
    return bool((text[..., 1:] < text[..., :-1]).any())


def _decode_eagerly(kwargs: dict[str, Any]) -> None:
    """Keep ``generate`` from compiling its decode step. torch.compile does not retrace a module when hooks
    are added or removed after it was compiled (dynamo's ``skip_nnmodule_hook_guards``), so a compiled step
    could silently run without the pruning fixes; static caches still work, decoded eagerly."""
    if kwargs.get("disable_compile") is False:
        raise VTPruneError("generate(disable_compile=False) with vtprune hooks: a compiled decode step may skip "
                           "the hooks (torch.compile does not retrace modules whose hooks changed), so vtprune "
                           "decodes eagerly; drop disable_compile=False")
    static = kwargs.get("cache_implementation") not in (None, "dynamic") or is_static(kwargs.get("past_key_values"))
    if static and "disable_compile" not in kwargs:
        warnings.warn("vtprune: static-cache generation decodes eagerly while pruning hooks are installed "
                      "(torch.compile would not see them)", stacklevel=3)
    kwargs["disable_compile"] = True


class Engine:
    """Applies one pruner to one model through hooks."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, pruner: Pruner, config: PrunerConfig) -> None:
        self.model, self.adapter, self.pruner, self.config = model, adapter, pruner, config
        self.recorder = StatsRecorder(config.site, config.layer)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._spans: ImageSpans | None = None  # images of the call in flight
        self._call: _Call | None = None
        self._labels: torch.Tensor | None = None  # the in-flight call's labels, resized in place once pruned
        self._in_prefill = False
        self.signals = Signals(adapter, pruner, config)
        self._in_generate = False
        # a generate call continuing a pruned pre-LLM cache: how many cached tokens it feeds again (see
        # refed_tokens); it also derives positions from the pruned cache's length, so the ledger's replace them
        self._refeed: int | None = None
        # within one generate call: the last prefill's LM inputs and per-image selections
        self._memo: tuple[torch.Tensor, torch.Tensor, list[Selection]] | None = None
        self._prefix: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reuse: list[Selection] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------
    def install(self) -> None:
        self.signals.check()
        a = self.adapter
        self._handles.append(self.model.register_forward_pre_hook(self._labels_pre, with_kwargs=True))
        self._hook_pre(a.backbone, self._backbone_pre)
        self._hook_pre(a.language_model, self._lm_pre)
        if self.config.site == "layer":
            for i in range(self.config.layer, a.num_layers):
                self._hook_pre(a.layers[i], self._make_layer_pre(i))
        for layer in a.layers:
            self._hook_pre(layer, self._record_layer)
        self.signals.install(self._hook_pre)
        self._wrap_generate()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if getattr(self.model.__dict__.get("generate"), "_vtprune_engine", None) is self:
            del self.model.__dict__["generate"]
        self.reset()

    def reset(self) -> None:
        """Forget everything earlier calls left behind (selections kept for reuse, in-flight state)."""
        self._spans = self._call = self._labels = None
        self._memo = self._prefix = self._reuse = None

    def _hook_pre(self, module: nn.Module, fn) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def _wrap_generate(self) -> None:
        """Make each ``model.generate`` call a scope for selection reuse (an instance attribute; removed)."""
        original = self.model.generate

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            _decode_eagerly(kwargs)
            self._memo, self._in_generate, self._refeed = None, True, None
            cache = kwargs.get("past_key_values")
            ledger = ledger_of(cache)
            if ledger is not None and self.config.site == "pre_llm":
                inputs = dict(kwargs, input_ids=args[0]) if args else kwargs
                self._refeed = refed_tokens(ledger, int(cache.get_seq_length()), inputs)
            try:
                return original(*args, **kwargs)
            finally:
                self._memo, self._in_generate, self._refeed = None, False, None

        generate._vtprune_engine = self  # type: ignore[attr-defined]
        self.model.generate = generate

    # ---- top level: labels --------------------------------------------------------------------------
    def _labels_pre(self, module, args, kwargs):
        """Labels cover the full sequence, logits the pruned one: hand the model a private copy of the labels
        that the plan resizes in place (``Tensor.set_``) once it is known, so its own loss code runs on the
        kept tokens' labels (pruned visual positions carry no loss)."""
        labels = kwargs.get("labels")
        self._labels = None
        if torch.is_tensor(labels):
            self._labels = labels.clone()
            kwargs["labels"] = self._labels
        return args, kwargs

    def _prune_labels(self, plan: KeepPlan) -> None:
        if self._labels is not None:
            if self._labels.shape[-1] != plan.full_len:
                raise VTPruneError(f"labels of length {self._labels.shape[-1]} for a sequence of {plan.full_len} "
                                   "tokens: with pruning, labels must cover exactly the tokens of this call")
            self._labels.set_(plan.gather_labels(self._labels))

    # ---- backbone -----------------------------------------------------------------------------------
    def _backbone_pre(self, module, args, kwargs):
        if args:  # positional input_ids
            kwargs = dict(kwargs, input_ids=args[0])
            args = ()
        past = _past_len(kwargs)
        ledger = ledger_of(kwargs.get("past_key_values")) if past else None
        if ledger is not None and self._refeed is not None:
            drop_leading(kwargs, self._refeed)
            self._refeed = 0
        self._spans = self.adapter.locate_images(kwargs)
        if ledger is not None and self._refeed is not None and self._spans is None:
            kwargs["position_ids"] = None
        if ledger is not None and kwargs.get("position_ids") is None:
            if self._spans is not None and self.adapter.position_axes > 1:
                raise VTPruneError(
                    "a later turn brings a new image into a pruned cache without position_ids: its M-RoPE "
                    "positions depend on the whole conversation, so pass position_ids (e.g. from the model's "
                    "get_rope_index on the full conversation, sliced to the new tokens)")
            ref = kwargs.get("input_ids")
            ref = ref if ref is not None else kwargs["inputs_embeds"]
            t = ledger.appended(past, pruned_length=self.config.site == "pre_llm")
            pos = ledger.next_pos[:, :, None] + t + torch.arange(ref.shape[1], device=ledger.next_pos.device)
            kwargs["position_ids"] = self.adapter.to_model_positions(pos)
        return args, kwargs

    # ---- language model -----------------------------------------------------------------------------
    def _lm_pre(self, module, args, kwargs):
        spans, self._spans = self._spans, None
        self._call = None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise VTPruneError("vtprune expects the VLM to call its language model with inputs_embeds")
        past = _past_len(kwargs)
        if past == 0:
            self._prefill(kwargs, spans, embeds)
        else:
            self._continue(kwargs, spans, embeds, past)
        return args, kwargs

    def _positions(self, kwargs: dict[str, Any], b: int, n: int, past: int, device) -> torch.Tensor:
        pos = kwargs.get("position_ids")
        return self.adapter.default_positions(b, n, past, device) if pos is None else self.adapter.as_axes(pos)

    def _prefill(self, kwargs: dict[str, Any], spans: ImageSpans | None, embeds: torch.Tensor) -> None:
        self._in_prefill = True
        self.signals.begin_prefill()
        b, full_len = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        real = _real_tokens(mask, b, full_len, 0, embeds.device)
        self.recorder.begin_prefill(real.sum(1))
        self._prefix = (embeds, real)
        self._reuse = self._reusable_selections(embeds, real)
        if spans is None:  # no images: nothing to prune, nothing to touch
            return
        pos = self._positions(kwargs, b, full_len, 0, embeds.device)
        next_pos = pos.masked_fill(~real[None], -1).amax(-1) + 1  # [A, b]
        self._describe(spans, embeds, pos, real, b)
        static = is_static(kwargs.get("past_key_values"))
        if self.config.site == "layer":
            self._call = _Call(pending=_Pending(spans, real, next_pos), static=static)
            return
        plan = self._plan(embeds, spans, real)
        if plan.is_identity:
            return
        if mask is None and _is_packed(kwargs.get("position_ids")):
            raise VTPruneError("padding-free (packed) inputs cannot be pruned: transformers finds the sequence "
                               "boundaries from consecutive position ids, which pruning breaks; pass a padded "
                               "batch with an attention mask instead")
        kept_real = plan.gather(real, 1) & plan.valid
        self.recorder.real = kept_real.sum(1)
        kwargs["inputs_embeds"] = plan.apply_states(embeds)
        kwargs["attention_mask"] = self._gather_mask(mask, plan, plan, static)
        kept_pos = plan.gather(pos, seq_dim=-1, batch_dim=-2)
        delta = None
        if self.config.positions == "compact":
            compact = (kept_real.long().cumsum(1) - 1).clamp(min=0)
            delta = next_pos - kept_real.sum(1)[None]
            kept_pos = compact[None].expand(pos.shape[0], -1, -1)
        kwargs["position_ids"] = self._model_positions(kept_pos, kwargs.get("position_ids"))
        self._prune_labels(plan)
        cache = self._cache(kwargs)
        if cache is not None:
            attach(cache, Ledger(plan=plan, next_pos=next_pos, real=kept_real, pos_delta=delta))

    def _describe(self, spans: ImageSpans, embeds: torch.Tensor, pos: torch.Tensor, real, b: int) -> None:
        """Fill in each image's layout and the signals its pruner reads."""
        spans.layouts = [self.adapter.layout(embeds[row, p], pos[:, row, p])
                         for row, p in zip(spans.rows, spans.positions)]
        spans.extras = self.signals.image_extras(spans, b)

    def _cache(self, kwargs: dict[str, Any]):
        """The cache this call writes to; created here, as the language model would, when it would create one
        (so that the ledger can be attached to it)."""
        cache = kwargs.get("past_key_values")
        if cache is None and kwargs.get("use_cache") and not torch.jit.is_tracing():
            cache = kwargs["past_key_values"] = DynamicCache(config=self.adapter.language_model.config)
        return cache

    def _gather_mask(self, mask: Any, cols: KeepPlan, rows: KeepPlan, static: bool) -> Any:
        """A pruning call's mask, gathered to its kept tokens (keys by ``cols``, queries by ``rows``)."""
        if mask is None:
            return cols.valid.long() if cols.has_padding_slots else None
        if isinstance(mask, dict):
            return {k: None if m is None else cols.gather_4d_mask(m, rows, static) for k, m in mask.items()}
        if mask.dim() == 2:
            return cols.gather_2d_mask(mask)
        if mask.dim() == 4:
            return cols.gather_4d_mask(mask, rows, static)
        raise VTPruneError(f"unexpected attention mask of shape {tuple(mask.shape)}: expected [batch, seq] or "
                           "[batch, heads, query, key]")

    def _continue(self, kwargs: dict[str, Any], spans: ImageSpans | None, embeds: torch.Tensor, past: int) -> None:
        """A call on a non-empty cache: decode steps, a later turn, possibly with new images."""
        self._in_prefill = False
        self.signals.end_prefill()
        cache = kwargs["past_key_values"]
        ledger = ledger_of(cache)
        pre_llm = self.config.site == "pre_llm"
        if ledger is not None:
            self.recorder.decode_step()
        b, q = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        static = is_static(cache)
        if spans is not None:
            if isinstance(mask, dict) or (torch.is_tensor(mask) and mask.dim() != 2):
                raise VTPruneError("a new image on a cached conversation needs a 2-D attention mask (or none); "
                                   "static caches build 4-D masks, so pass images of later turns with a dynamic cache")
            if self.config.positions == "compact":
                raise VTPruneError("positions='compact' cannot continue a conversation with a new image: the "
                                   "compact numbering of the cached tokens is fixed; use positions='original'")
            real = _real_tokens(mask, b, q, past, embeds.device)
            if ledger is None:
                prior = torch.ones(b, past, dtype=torch.bool, device=embeds.device) if mask is None else \
                    mask[:, :past].bool()
                base, base_real = KeepPlan.identity(b, past, embeds.device), prior
            else:
                t = ledger.appended(past, pre_llm)
                base = ledger.plan.extend(t)
                base_real = torch.cat([ledger.real, torch.ones(b, t, dtype=torch.bool, device=embeds.device)], 1)
            pos = self._positions(kwargs, b, q, base.full_len, embeds.device)
            next_pos = pos.masked_fill(~real[None], -1).amax(-1) + 1
            self.recorder.begin_prefill(real.sum(1))
            self.signals.begin_prefill()
            self._in_prefill, self._reuse, self._prefix = True, None, None
            self._describe(spans, embeds, pos, real, b)
            if not pre_llm:
                self._call = _Call(cols=None if ledger is None else base, extra=q, static=static,
                                   pending=_Pending(spans, real, next_pos, base, base_real))
                return
            chunk = self._plan(embeds, spans, real)
            if not chunk.is_identity:
                cols = base.concat(chunk)
                kept_real = chunk.gather(real, 1) & chunk.valid
                kwargs["inputs_embeds"] = chunk.apply_states(embeds)
                kwargs["attention_mask"] = (cols.gather_2d_mask(mask) if mask is not None
                                            else torch.cat([base_real, kept_real], 1).long())
                given = kwargs.get("position_ids")
                kwargs["position_ids"] = self._model_positions(chunk.gather(pos, seq_dim=-1, batch_dim=-2), given)
                self._prune_labels(chunk)
                attach(cache, Ledger(plan=cols, next_pos=next_pos, real=torch.cat([base_real, kept_real], 1)))
                return
            if ledger is None:
                return
        if ledger is None:
            return
        if not pre_llm:  # the LM keeps full-length coordinates; layers >= K fix themselves
            self._call = _Call(cols=ledger.plan, extra=ledger.appended(past, False) + q, static=static)
            return
        kwargs["attention_mask"] = cache_mask(ledger, mask, past, q, static)
        pos = kwargs.get("position_ids")
        if ledger.pos_delta is not None and pos is not None:
            kwargs["position_ids"] = self._compact_decode_positions(pos, ledger.pos_delta)

    def _compact_decode_positions(self, pos: torch.Tensor, pos_delta: torch.Tensor) -> torch.Tensor:
        axes = self.adapter.as_axes(pos)
        if axes.shape[0] == 4 and pos_delta.shape[0] == 3:  # text row + M-RoPE rows
            delta = torch.cat([pos_delta[:1], pos_delta])
        elif axes.shape[0] == pos_delta.shape[0]:
            delta = pos_delta
        elif axes.shape[0] == 3 and pos_delta.shape[0] == 4:
            delta = pos_delta[1:]
        else:
            raise VTPruneError(f"cannot map decode position ids of shape {tuple(pos.shape)} to the compact "
                               "positions of the prefill")
        return (axes - delta[:, :, None]).reshape(pos.shape)

    def _model_positions(self, pos: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
        """[A, b, L] back to the layout the model was given (2D for LLaVA; 3 or 4 rows for Qwen)."""
        if given is None or given.dim() == 3:
            return self.adapter.to_model_positions(pos) if given is None else pos
        return pos[0]

    # ---- decoder layers (in-LLM site) ---------------------------------------------------------------
    def _make_layer_pre(self, index: int):
        def hook(module, args, kwargs):
            call = self._call
            if call is None:
                return None
            if call.pending is not None and index == self.config.layer:
                args, kwargs = self._select_at_layer(args, kwargs, call)
            if call.cols is not None:
                self._gather_layer_kwargs(kwargs, call)
            return args, kwargs
        return hook

    def _select_at_layer(self, args: tuple, kwargs: dict[str, Any], call: _Call):
        """Layer K of a call with images: select, then shorten this call's tokens from here on."""
        p, call.pending = call.pending, None
        hidden = _hidden(args, kwargs)
        self.signals.add_llm_extras(p.spans, p.real)
        plan = self._plan(hidden, p.spans, p.real)
        if plan.is_identity:
            return args, kwargs
        kept = plan.gather(p.real, 1) & plan.valid
        self.recorder.real = kept.sum(1)
        call.rows, call.extra = plan, 0
        call.cols = plan if p.base is None else p.base.concat(plan)
        self._prune_labels(plan)
        cache = kwargs.get("past_key_values")
        if cache is not None:
            real = kept if p.base_real is None else torch.cat([p.base_real, kept], 1)
            attach(cache, Ledger(plan=call.cols, next_pos=p.next_pos, real=real))
        if args:
            return (plan.apply_states(hidden),) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = plan.apply_states(hidden)
        return args, kwargs

    def _gather_layer_kwargs(self, kwargs: dict[str, Any], call: _Call) -> None:
        """Rotary cos/sin, text position ids and the attention mask of a layer >= K, to kept tokens."""
        cols, rows = call.cols, call.rows
        if rows is not None:
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                kwargs["position_embeddings"] = tuple(rows.gather(t, seq_dim=-2, batch_dim=0) for t in pe)
            pid = kwargs.get("position_ids")
            if torch.is_tensor(pid) and pid.shape[-1] == rows.full_len:
                kwargs["position_ids"] = rows.gather(pid, seq_dim=-1, batch_dim=-2)
        mask = kwargs.get("attention_mask")
        if mask is None:
            if cols.has_padding_slots:  # the model assumed no padding; re-padding added some
                q = rows.length if rows is not None else kwargs["position_embeddings"][0].shape[-2]
                impl = self.adapter.attn_implementation
                if impl.startswith("flash"):
                    ones = torch.ones(cols.valid.shape[0], call.extra, dtype=torch.long, device=cols.valid.device)
                    kwargs["attention_mask"] = torch.cat([cols.valid.long(), ones], 1)
                else:
                    kind = "additive" if impl == "eager" else "bool"
                    kwargs["attention_mask"] = cols.causal_mask(q, call.extra, kind, self._dtype())
        elif mask.dim() == 2:
            kwargs["attention_mask"] = cols.gather_2d_mask(mask)
        elif mask.dim() == 4:
            kwargs["attention_mask"] = cols.gather_4d_mask(mask, rows, call.static)
        else:
            raise VTPruneError(f"unexpected attention mask of shape {tuple(mask.shape)} in decoder layer")

    def _dtype(self) -> torch.dtype:
        return next(self.adapter.language_model.parameters()).dtype

    # ---- selection ----------------------------------------------------------------------------------
    def _reusable_selections(self, embeds: torch.Tensor, real: torch.Tensor) -> list[Selection] | None:
        """Within one ``generate`` call, the last prefill's selections if this prefill only appends tokens to
        it (uncached generation re-runs the growing prompt): the images were already pruned for that prompt,
        so the choice stands even for pruners that read the last prompt token. Never across calls."""
        if self._memo is None or not self._in_generate:
            return None
        old_embeds, old_real, selections = self._memo
        b, n = old_embeds.shape[:2]
        if embeds.shape[0] != b or embeds.shape[1] < n:
            return None
        if not (torch.equal(real[:, :n], old_real) and torch.equal(embeds[:, :n], old_embeds)):
            return None
        return selections

    def _plan(self, states: torch.Tensor, spans: ImageSpans, real: torch.Tensor) -> KeepPlan:
        """Ask the pruner about every image and turn the answers into a keep plan."""
        keep = torch.ones_like(real)
        replacements: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        image_rows = spans.image_mask(real.shape)
        pruned_any = False
        selections: list[Selection] = []
        for i, (row, pos, layout) in enumerate(zip(spans.rows, spans.positions, spans.layouts)):
            n = pos.numel()
            k = min(self.pruner.count(layout), n)
            keep[row, pos] = False
            pruned_any |= k < n
            if k >= n:
                sel = Selection(indices=torch.arange(n, device=pos.device))
            elif self._reuse is not None and i < len(self._reuse):
                sel = self._reuse[i]
            else:
                view = VisualView(features=states[row, pos], text=states[row, real[row] & ~image_rows[row]],
                                  layout=layout, site=self.config.site, layer=self.config.layer,
                                  sample=row, image=i, extras=spans.extras[i])
                sel = self.pruner.select(view, k)
                sel.check(n, k)
            kept = pos[sel.indices.to(pos.device)]
            keep[row, kept] = True
            if sel.embeddings is not None:
                replacements.append((row, kept, sel.embeddings))
            self.recorder.add_image(row, n, k)
            selections.append(sel)
        if self._prefix is not None and self._in_prefill:
            self._memo = (*self._prefix, selections)
        if pruned_any:  # drop the batch's original padding too; rows are re-padded to the new longest row
            keep &= real
        return KeepPlan.from_keep_mask(keep, replacements)

    # ---- stats --------------------------------------------------------------------------------------
    def _record_layer(self, module, args, kwargs):
        if self._in_prefill:
            self.recorder.layer(_hidden(args, kwargs).shape[1])
        return None
