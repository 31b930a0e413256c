"""The hook engine: installs forward(-pre) hooks on a stock ``transformers`` VLM and applies keep plans.

Hooks (all with kwargs, all removed by :meth:`Engine.remove`):

* backbone pre-hook (``model.model``): remembers where the images are (it still sees ``input_ids``) and,
  on decode steps without explicit position ids, supplies them in original coordinates;
* language-model pre-hook: pre-LLM site — selects visual tokens and gathers embeddings, 2D mask and
  position ids; every site — fixes decode-time masks/positions to the pruned cache;
* decoder-layer pre-hooks on layers K..T-1 (in-LLM site): layer K selects from its input hidden states;
  every layer >= K gets its rotary cos/sin, position ids and masks gathered to the kept tokens;
* a light pre-hook on every decoder layer records the sequence length it processed (``handle.stats``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import ImageSpans, ModelAdapter
from .config import PrunerConfig
from .errors import VTPruneError
from .plan import KeepPlan
from .pruners.base import Pruner
from .signals import Signals
from .stats import StatsRecorder
from .view import Selection, VisualView


@dataclass
class _Prefill:
    """What decode steps need to know about the last pruned prefill."""

    plan: KeepPlan | None
    full_len: int
    cache_len: int  # layer-0 KV length right after prefill
    next_pos: torch.Tensor  # [A, b] next position per axis, original coordinates
    pos_delta: torch.Tensor | None = None  # [A, b] original minus compact next position (compact policy)


def _past_len(kwargs: dict[str, Any]) -> int:
    past = kwargs.get("past_key_values")
    return 0 if past is None else int(past.get_seq_length())


def _hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class Engine:
    """Applies one pruner to one model through hooks."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, pruner: Pruner, config: PrunerConfig) -> None:
        self.model, self.adapter, self.pruner, self.config = model, adapter, pruner, config
        self.recorder = StatsRecorder(config.site, config.layer)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._spans: ImageSpans | None = None  # images of the prefill in flight
        self._prefill: _Prefill | None = None  # state for the decode steps that follow
        self._in_prefill = False
        self._decode_new = 0  # tokens appended since the prefill, including the ones decoded now
        self._layer_ctx: dict[str, Any] = {}  # in-LLM site: full-length facts captured at the LM pre-hook
        self.signals = Signals(adapter, pruner, config)
        # the last prefill's LM inputs and per-image selections, reused by a prefill that extends it
        self._memo: tuple[torch.Tensor, torch.Tensor, list[Selection]] | None = None
        self._prefix: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reuse: list[Selection] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------
    def install(self) -> None:
        self.signals.check()
        a = self.adapter
        self._hook_pre(a.backbone, self._backbone_pre)
        self._hook_pre(a.language_model, self._lm_pre)
        if self.config.site == "layer":
            for i in range(self.config.layer, a.num_layers):
                self._hook_pre(a.layers[i], self._make_layer_pre(i))
        for layer in a.layers:
            self._hook_pre(layer, self._record_layer)
        self.signals.install(self._hook_pre)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._prefill = self._spans = self._memo = self._prefix = self._reuse = None
        self._layer_ctx = {}

    def _hook_pre(self, module: nn.Module, fn) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    # ---- backbone -----------------------------------------------------------------------------------
    def _backbone_pre(self, module, args, kwargs):
        if args:  # positional input_ids
            kwargs = dict(kwargs, input_ids=args[0])
            args = ()
        if _past_len(kwargs) == 0:
            self._spans = self.adapter.locate_images(kwargs)
            return args, kwargs
        st = self._prefill
        if st is not None and kwargs.get("position_ids") is None:
            ref = kwargs.get("input_ids")
            ref = ref if ref is not None else kwargs["inputs_embeds"]
            q = ref.shape[1]
            t = _past_len(kwargs) - st.cache_len
            pos = st.next_pos[:, :, None] + t + torch.arange(q, device=st.next_pos.device)
            kwargs["position_ids"] = self.adapter.to_model_positions(pos)
        return args, kwargs

    # ---- language model -----------------------------------------------------------------------------
    def _lm_pre(self, module, args, kwargs):
        if _past_len(kwargs) > 0:
            self._in_prefill = False
            self.signals.end_prefill()
            if self._prefill is not None:
                self.recorder.decode_step()
                q = kwargs["inputs_embeds"].shape[1]
                self._decode_new = _past_len(kwargs) - self._prefill.cache_len + q
                self._fix_decode(kwargs)
            return args, kwargs
        self._in_prefill = True
        self._prefill = None
        self.signals.begin_prefill()
        spans, self._spans = self._spans, None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise VTPruneError("vtprune expects the VLM to call its language model with inputs_embeds")
        b, full_len = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
            raise VTPruneError("vtprune needs a 2D [batch, seq] attention mask (or none) at prefill; got "
                               f"{type(mask).__name__}{'' if not torch.is_tensor(mask) else tuple(mask.shape)}")
        real = torch.ones(b, full_len, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        self.recorder.begin_prefill(real.sum(1))
        self._prefix, self._reuse = (embeds, real), self._reusable_selections(embeds, real)
        if spans is None:  # no images: run unpruned, record it
            return args, kwargs
        pos = kwargs.get("position_ids")
        pos = (self.adapter.default_positions(b, full_len, 0, embeds.device) if pos is None
               else self.adapter.as_axes(pos))
        next_pos = pos.masked_fill(~real[None], -1).amax(-1) + 1  # [A, b]
        spans.layouts = [self.adapter.layout(embeds[row, p], pos[:, row, p])
                         for row, p in zip(spans.rows, spans.positions)]
        spans.extras = self.signals.image_extras(spans, b)
        if self.config.site == "layer":
            self._layer_ctx = {"spans": spans, "real": real}
            self._prefill = _Prefill(plan=None, full_len=full_len, cache_len=full_len, next_pos=next_pos)
            return args, kwargs
        plan = self._plan(embeds, spans, real)
        kept_real = plan.gather(real, 1) & plan.valid
        self.recorder.real = kept_real.sum(1)
        kwargs["inputs_embeds"] = plan.apply_states(embeds)
        kwargs["attention_mask"] = (plan.gather_2d_mask(mask) if mask is not None else plan.valid.long())
        kept_pos = plan.gather(pos, seq_dim=-1, batch_dim=-2)
        delta = None
        if self.config.positions == "compact":
            compact = (kept_real.long().cumsum(1) - 1).clamp(min=0)
            compact_next = kept_real.sum(1)
            delta = next_pos - compact_next[None]
            kept_pos = compact[None].expand(pos.shape[0], -1, -1)
        kwargs["position_ids"] = self._model_positions(kept_pos, kwargs.get("position_ids"))
        self._prefill = _Prefill(plan=plan, full_len=full_len, cache_len=plan.length, next_pos=next_pos,
                                 pos_delta=delta)
        return args, kwargs

    def _model_positions(self, pos: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
        """[A, b, L] back to the layout the model was given (2D for LLaVA; 3 or 4 rows for Qwen)."""
        if given is None or given.dim() == 3:
            return self.adapter.to_model_positions(pos) if given is None else pos
        return pos[0]

    def _fix_decode(self, kwargs: dict[str, Any]) -> None:
        """Decode step after a pruned prefill: express mask and positions in pruned-cache coordinates."""
        st = self._prefill
        if self.config.site == "layer":  # the LM keeps full-length coordinates; layers >= K fix themselves
            return
        ref = kwargs["inputs_embeds"]
        b, q = ref.shape[:2]
        past = _past_len(kwargs)
        new_cols = self._decode_new
        mask = kwargs.get("attention_mask")
        if mask is None:
            ones = torch.ones(b, new_cols, dtype=torch.long, device=ref.device)
            kwargs["attention_mask"] = torch.cat([st.plan.valid.long(), ones], 1)
        elif torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] == st.full_len + new_cols:
            kwargs["attention_mask"] = st.plan.gather_2d_mask(mask)
        elif not (torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] == past + q):
            raise VTPruneError(
                f"decode-step attention mask of shape {getattr(mask, 'shape', type(mask))} matches neither the "
                f"unpruned length {st.full_len + new_cols} nor the pruned cache length {past + q}")
        pos = kwargs.get("position_ids")
        if st.pos_delta is not None and pos is not None:
            axes = self.adapter.as_axes(pos)
            if axes.shape[0] == 4 and st.pos_delta.shape[0] == 3:  # text row + M-RoPE rows
                delta = torch.cat([st.pos_delta[:1], st.pos_delta])
            elif axes.shape[0] == st.pos_delta.shape[0]:
                delta = st.pos_delta
            elif axes.shape[0] == 3 and st.pos_delta.shape[0] == 4:
                delta = st.pos_delta[1:]
            else:
                raise VTPruneError(f"cannot map decode position ids of shape {tuple(pos.shape)} to the compact "
                                   "positions of the prefill")
            kwargs["position_ids"] = (axes - delta[:, :, None]).reshape(pos.shape)

    # ---- decoder layers (in-LLM site) ---------------------------------------------------------------
    def _make_layer_pre(self, index: int):
        def hook(module, args, kwargs):
            st = self._prefill
            if st is None:
                return None
            if self._in_prefill:
                if index == self.config.layer:
                    hidden = _hidden(args, kwargs)
                    ctx = self._layer_ctx
                    self.signals.add_llm_extras(ctx["spans"], ctx["real"])
                    st.plan = self._plan(hidden, ctx["spans"], ctx["real"])
                    self.recorder.real = (st.plan.gather(ctx["real"], 1) & st.plan.valid).sum(1)
                    args, kwargs = self._set_hidden(args, kwargs, st.plan.apply_states(hidden))
                self._gather_layer_kwargs(kwargs, st.plan, prefill=True)
            elif st.plan is not None:
                self._gather_layer_kwargs(kwargs, st.plan, prefill=False)
            return args, kwargs
        return hook

    @staticmethod
    def _set_hidden(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _gather_layer_kwargs(self, kwargs: dict[str, Any], plan: KeepPlan, prefill: bool) -> None:
        """Rotary cos/sin, text position ids and the attention mask of a layer >= K, to kept tokens."""
        if prefill:
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                kwargs["position_embeddings"] = tuple(plan.gather(t, seq_dim=-2, batch_dim=0) for t in pe)
            pid = kwargs.get("position_ids")
            if torch.is_tensor(pid) and pid.shape[-1] == plan.full_len:
                kwargs["position_ids"] = plan.gather(pid, seq_dim=-1, batch_dim=-2)
        mask = kwargs.get("attention_mask")
        if mask is None:
            if plan.has_padding_slots:  # the model assumed no padding; re-padding added some
                q = plan.length if prefill else self._decode_q(kwargs)
                extra = 0 if prefill else self._decode_new
                impl = self.adapter.attn_implementation
                if impl.startswith("flash"):
                    ones = torch.ones(plan.valid.shape[0], extra, dtype=torch.long, device=plan.valid.device)
                    kwargs["attention_mask"] = torch.cat([plan.valid.long(), ones], 1)
                else:
                    kind = "additive" if impl == "eager" else "bool"
                    kwargs["attention_mask"] = plan.causal_mask(q, extra, kind, self._dtype())
        elif mask.dim() == 2:
            kwargs["attention_mask"] = plan.gather_2d_mask(mask)
        elif mask.dim() == 4:
            kwargs["attention_mask"] = plan.gather_4d_mask(mask, rows=prefill)
        else:
            raise VTPruneError(f"unexpected attention mask of shape {tuple(mask.shape)} in decoder layer")

    def _dtype(self) -> torch.dtype:
        return next(self.adapter.language_model.parameters()).dtype

    @staticmethod
    def _decode_q(kwargs: dict[str, Any]) -> int:
        return kwargs["position_embeddings"][0].shape[-2]

    # ---- selection ----------------------------------------------------------------------------------
    def _reusable_selections(self, embeds: torch.Tensor, real: torch.Tensor) -> list[Selection] | None:
        """The last prefill's selections if this prefill only appends tokens to it (uncached generation,
        a continued prompt): the images were already pruned for that prompt, so the choice stands even
        for pruners that read the last prompt token."""
        if self._memo is None:
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
        self._memo = (*self._prefix, selections)
        if pruned_any:  # drop the batch's original padding too; rows are re-padded to the new longest row
            keep &= real
        return KeepPlan.from_keep_mask(keep, replacements)

    # ---- stats --------------------------------------------------------------------------------------
    def _record_layer(self, module, args, kwargs):
        if self._in_prefill:
            self.recorder.layer(_hidden(args, kwargs).shape[1])
        return None
