"""The hook engine: a small orchestrator that installs forward(-pre) hooks on a stock ``transformers`` VLM and
hands each call to the pruning site (:mod:`vtprune.sites`).

Hooks (all with kwargs, all removed by :meth:`Engine.remove`):

* top-level pre-hook: when ``labels`` are given, makes them follow the pruned sequence (``_labels_pre``);
* backbone pre-hook (``model.model``): finds the images (it still sees ``input_ids``); on calls that continue a
  pruned cache, drops tokens the cache already holds and supplies positions in original coordinates;
* language-model pre-hook: describes a call with images (an :class:`~vtprune.sites.ImageCall`) or a
  continuation of a pruned cache, and lets the site act on it;
* the site's own hooks (in-LLM: decoder layers K..T-1), and a light pre-hook on every decoder layer that
  records the sequence length it processed (``handle.stats``).

``model.generate`` is wrapped on the instance (not the class) so that one generation call is a scope:
uncached generation re-runs the growing prompt and reuses the selections made for it within that call only.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from .capture import HINTS, LAYER_QK, LLM_QK, LM_INPUT, Signals
from .config import PrunerConfig
from .errors import VTPruneError
from .methods.base import Pruner
from .models import ImageSpans, ModelAdapter
from .ops import merge_dropped
from .plan import KeepPlan
from .sites import ImageCall, site_class
from .sites.base import restrict_extras
from .sites.continuation import drop_leading, is_static, ledger_of, refed_tokens
from .stats import StatsRecorder
from .view import ImageLayout, Selection, VisualView, frame_budgets, on_device


def _past_len(kwargs: dict[str, Any]) -> int:
    past = kwargs.get("past_key_values")
    return 0 if past is None else int(past.get_seq_length())


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


def _text_states(states: torch.Tensor, spans: ImageSpans, real: torch.Tensor, row: int) -> torch.Tensor:
    """[T, D] ``states`` of ``row``'s real non-image tokens (a view's text, found only when a pruner reads it)."""
    return states[row, spans.text_index(real, row)]


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


def select_per_frame(pruner: Pruner, view: VisualView, k: int,
                     check: Callable[[Selection, int, int], None] = Selection.check) -> Selection:
    """A video's selection with its ``k`` tokens shared over its frames (``per_frame=True``,
    :func:`vtprune.view.frame_budgets`): the pruner chooses in each frame alone, seeing that frame as an image (its
    grid, its tokens' states and per-token signals); states it replaces are merged back in video order. Tokens
    outside every frame (LLaVA-OneVision's trailing newline) are kept and count toward ``k``. Each frame's answer goes
    through ``check(selection, tokens, k)`` (the engine's may defer the read of its device checks)."""
    if HINTS in pruner.needs:
        raise VTPruneError(f"pruner {pruner.config.name!r} reads caller hints given per token of the whole video, "
                           "which per-frame selection cannot index; use per_frame=False")
    layout, n = view.layout, view.num_tokens
    outside = torch.nonzero(layout.frame_index() < 0).flatten().to(view.features.device)
    if k < outside.numel():
        raise VTPruneError(f"per_frame=True: a budget of {k} tokens cannot keep the video's {outside.numel()} "
                           "tokens outside its frames")
    budgets = frame_budgets(k - outside.numel(), layout)
    parts: list[tuple[torch.Tensor, Selection]] = []
    for f, (tokens, kf) in enumerate(zip(layout.frame_tokens(), budgets)):
        if kf == 0:
            continue
        tokens = tokens.to(view.features.device)
        frame = ImageLayout(tuple(seg for seg, fr in zip(layout.segments, layout.frames) if fr == f))
        sub = dataclasses.replace(view, features=view.features[tokens], layout=frame,
                                  extras=_frame_extras(view.extras, tokens, n))
        sel = pruner.select(sub, kf)
        check(sel, tokens.numel(), kf)
        parts.append((tokens, sel))
    if outside.numel():
        parts.append((outside, Selection(indices=torch.arange(outside.numel(), device=outside.device))))
    indices = torch.cat([tokens[sel.indices.to(tokens.device)] for tokens, sel in parts])
    embeddings = sizes = None
    if any(sel.embeddings is not None for _, sel in parts):
        embeddings = torch.cat([view.features[tokens[sel.indices]] if sel.embeddings is None else sel.embeddings
                                for tokens, sel in parts])
    if any(sel.sizes is not None for _, sel in parts):
        sizes = torch.cat([torch.ones(sel.indices.numel(), dtype=torch.long, device=indices.device)
                           if sel.sizes is None else sel.sizes.to(indices.device) for _, sel in parts])
    order = indices.argsort()  # frames come in token order; tokens outside them may sit anywhere
    return Selection(indices=indices[order], embeddings=None if embeddings is None else embeddings[order],
                     sizes=None if sizes is None else sizes[order])


def _frame_extras(extras: dict[str, Any], tokens: torch.Tensor, n: int) -> dict[str, Any]:
    """A video's extras for one frame's ``tokens`` (indices into its ``n`` tokens): per-token signals restricted,
    decoder q/k and layer-0 inputs pointing at the frame's tokens only."""
    out = restrict_extras(extras, tokens, n)
    for key in (LLM_QK, LAYER_QK, LM_INPUT):
        if key in extras:
            # the text after the frame is not the text after the video: counted anew
            out[key] = dataclasses.replace(extras[key], image=extras[key].image[tokens.to(extras[key].image.device)],
                                           text_after=None)
    return out


class Engine:
    """Applies one pruner to one model through hooks, at the site its config names."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, pruner: Pruner, config: PrunerConfig) -> None:
        self.model, self.adapter, self.pruner, self.config = model, adapter, pruner, config
        self.recorder = StatsRecorder(config.site, config.layer)
        self.signals = Signals(adapter, pruner, config)
        self.site = site_class(config.site)(self)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._spans: ImageSpans | None = None  # images of the call in flight
        #: the 2-D (or absent) mask the backbone got for the call in flight, before it made per-layer masks of it
        self.backbone_mask: Any = None
        self._labels: torch.Tensor | None = None  # the in-flight call's labels, resized in place once pruned
        self._in_prefill = False
        self._in_generate = False
        # a generate call continuing a pruned pre-LLM cache: how many cached tokens it feeds again (see
        # refed_tokens); it also derives positions from the pruned cache's length, so the ledger's replace them
        self._refeed: int | None = None
        # within one generate call: the last prefill's LM inputs and per-image selections
        # (selections by stage: a multi-stage schedule selects once per cut)
        self._memo: tuple[torch.Tensor, torch.Tensor, dict[int, list[Selection]]] | None = None
        self._prefix: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reuse: dict[int, list[Selection]] | None = None
        #: contract checks of the call in flight read after the language model ran: (the check's device bool,
        #: what raises its named error once it read true)
        self._unchecked: list[tuple[torch.Tensor, Callable[[], None]]] = []

    # ---- lifecycle ----------------------------------------------------------------------------------
    def install(self) -> None:
        self.signals.check()
        a = self.adapter
        self._handles.append(self.model.register_forward_pre_hook(self._labels_pre, with_kwargs=True))
        self.hook_pre(a.backbone, self._backbone_pre)
        self.hook_pre(a.language_model, self._lm_pre)
        self._handles.append(a.language_model.register_forward_hook(self._lm_post, with_kwargs=True))
        self.site.install()
        for layer in a.layers:
            self.hook_pre(layer, self._record_layer)
        self.signals.install(self.hook_pre)
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
        self._spans = self._labels = None
        self._memo = self._prefix = self._reuse = None
        self._unchecked = []
        self.site.reset()

    def hook_pre(self, module: nn.Module, fn) -> None:
        """Register a kwargs forward pre-hook that :meth:`remove` takes out again."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def track(self, handle: Any) -> None:
        """Have :meth:`remove` call ``handle.remove()`` too (e.g. an adapter's instance patches)."""
        self._handles.append(handle)

    def _wrap_generate(self) -> None:
        """Make each ``model.generate`` call a scope for selection reuse (an instance attribute; removed)."""
        original = self.model.generate

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            _decode_eagerly(kwargs)
            self.adapter.observe_generate(kwargs)
            self._memo, self._in_generate, self._refeed = None, True, None
            cache = kwargs.get("past_key_values")
            ledger = ledger_of(cache)
            if ledger is not None and self.site.shortens_cache:
                inputs = dict(kwargs, input_ids=args[0]) if args else kwargs
                self._refeed = refed_tokens(ledger, int(cache.get_seq_length()), inputs)
            try:
                return original(*args, **kwargs)
            finally:
                self._memo = self._prefix = self._refeed = None
                self._in_generate = False

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

    def prune_labels(self, plan: KeepPlan) -> None:
        """Make the in-flight call's labels (if any) follow ``plan``."""
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
        if ledger is not None and self._refeed:
            drop_leading(kwargs, self._refeed)
            self._refeed = 0
        self._spans = self.adapter.locate_images(kwargs)
        self.backbone_mask = kwargs.get("attention_mask")
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
            t = ledger.appended(past, self.site.shortens_cache)
            pos = ledger.next_pos[:, :, None] + t + torch.arange(ref.shape[1], device=ledger.next_pos.device)
            kwargs["position_ids"] = self.adapter.to_model_positions(pos)
        return args, kwargs

    # ---- language model -----------------------------------------------------------------------------
    def _lm_pre(self, module, args, kwargs):
        spans, self._spans = self._spans, None
        self._unchecked = []
        self.site.reset()
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise VTPruneError("vtprune expects the VLM to call its language model with inputs_embeds")
        past = _past_len(kwargs)
        try:
            if past == 0:
                self._prefill(kwargs, spans, embeds)
            else:
                self._continue(kwargs, spans, embeds, past)
        finally:
            self.backbone_mask = None
        return args, kwargs

    def _lm_post(self, module, args, kwargs, output):
        """Raise what the deferred contract checks of this call's selections found."""
        self.check_selections()
        return None

    def check_selections(self) -> None:
        """Raise the named error of the first broken selection among those whose check was deferred (one host read
        for all of them; the in-LLM site defers them so that its cut reads nothing while layers are in flight)."""
        pending, self._unchecked = self._unchecked, []
        if not pending:
            return
        device = pending[0][0].device
        bads = [on_device(bad, device) for bad, _ in pending]
        if bool(bads[0] if len(bads) == 1 else torch.stack(bads).any()):
            for bad, explain in pending:
                if bool(bad):
                    explain()

    def _image_call(self, kwargs: dict[str, Any], spans: ImageSpans, embeds: torch.Tensor, real: torch.Tensor,
                    past: int, base: KeepPlan | None = None, base_real: torch.Tensor | None = None) -> ImageCall:
        """Describe a call with images: positions, layouts and the signals its pruner reads."""
        b, q = embeds.shape[:2]
        given = kwargs.get("position_ids")
        pos = (self.adapter.default_positions(b, q, past, embeds.device) if given is None
               else self.adapter.as_axes(given))
        spans.layouts = [self.adapter.item_layout(spans, i, embeds[row, p], pos[:, row, p])
                         for i, (row, p) in enumerate(zip(spans.rows, spans.positions))]
        spans.extras = self.signals.image_extras(spans, b)
        next_pos = pos.masked_fill(~real[None], -1).amax(-1) + 1  # [A, b]
        return ImageCall(spans=spans, embeds=embeds, real=real, pos=pos, next_pos=next_pos,
                         static=is_static(kwargs.get("past_key_values")), base=base, base_real=base_real)

    def _prefill(self, kwargs: dict[str, Any], spans: ImageSpans | None, embeds: torch.Tensor) -> None:
        self._in_prefill = True
        self.signals.begin_prefill()
        b, full_len = embeds.shape[:2]
        real = _real_tokens(kwargs.get("attention_mask"), b, full_len, 0, embeds.device)
        self.recorder.begin_prefill(real.sum(1))
        self._prefix = (embeds, real) if self._in_generate else None  # reuse never crosses calls: keep nothing
        self._reuse = self._reusable_selections(embeds, real)
        if spans is not None:  # no images: nothing to prune, nothing to touch
            self.site.images(kwargs, self._image_call(kwargs, spans, embeds, real, 0))

    def _continue(self, kwargs: dict[str, Any], spans: ImageSpans | None, embeds: torch.Tensor, past: int) -> None:
        """A call on a non-empty cache: decode steps, a later turn, possibly with new images."""
        self._in_prefill = False
        self.signals.end_prefill()
        cache = kwargs["past_key_values"]
        ledger = ledger_of(cache)
        if ledger is not None:
            self.recorder.decode_step()
        b, q = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if spans is None:
            if ledger is not None:
                self.site.continuation(kwargs, ledger, past, q, is_static(cache))
            return
        if isinstance(mask, dict) and not isinstance(self.backbone_mask, dict):
            mask = self.backbone_mask  # the backbone made per-layer masks of it; the site rebuilds them
        if isinstance(mask, dict) or (torch.is_tensor(mask) and mask.dim() != 2):
            raise VTPruneError("a new image on a cached conversation needs a 2-D attention mask (or none); "
                               "static caches build 4-D masks, so pass images of later turns with a dynamic cache")
        if self.config.positions == "compact":
            raise VTPruneError("positions='compact' cannot continue a conversation with a new image: the "
                               "compact numbering of the cached tokens is fixed; use positions='original'")
        real = _real_tokens(mask, b, q, past, embeds.device)
        if ledger is None:
            base = KeepPlan.identity(b, past, embeds.device)
            base_real = torch.ones(b, past, dtype=torch.bool, device=embeds.device) if mask is None else \
                mask[:, :past].bool()
        else:
            t = ledger.appended(past, self.site.shortens_cache)
            base = ledger.plan.extend(t)
            base_real = ledger.physical_mask(t).bool()
        self.recorder.begin_prefill(real.sum(1))
        self.signals.begin_prefill()
        self._in_prefill, self._reuse, self._prefix = True, None, None
        self.site.images(kwargs, self._image_call(kwargs, spans, embeds, real, base.full_len, base, base_real))

    def family_masks(self, embeds: torch.Tensor, padding: torch.Tensor | None, cache: Any, from_layer: int,
                     blocks: torch.Tensor | None = None) -> dict[str, Any] | None:
        """The family's per-layer-type masks rebuilt for a pruned call (``ModelAdapter.lm_masks``); ``None`` where
        the sites gather the model's own masks instead — always when the caller gave the backbone a 4-D mask of
        its own, which the model applies as given to every layer."""
        given = self.backbone_mask
        if torch.is_tensor(given) and given.dim() == 4:
            return None
        return self.adapter.lm_masks(embeds, padding, cache, from_layer, blocks)

    def cache(self, kwargs: dict[str, Any]):
        """The cache this call writes to; created here, as the language model would, when it would create one
        (so that a ledger can be attached to it)."""
        cache = kwargs.get("past_key_values")
        if cache is None and kwargs.get("use_cache") and not torch.jit.is_tracing():
            cache = kwargs["past_key_values"] = DynamicCache(config=self.adapter.language_model.config)
        return cache

    # ---- selection ----------------------------------------------------------------------------------
    def _reusable_selections(self, embeds: torch.Tensor, real: torch.Tensor) -> dict[int, list[Selection]] | None:
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

    def select(self, states: torch.Tensor, spans: ImageSpans, real: torch.Tensor, stage: int = 0,
               pruner: Pruner | None = None, counts: list[int] | None = None, prior: torch.Tensor | None = None
               ) -> KeepPlan:
        """Ask the pruner about every image of a call (its tokens' ``states``) and turn the answers into a keep
        plan over the call's tokens. A later cut of a multi-stage schedule (``stage`` > 0, in-LLM) passes its own
        ``pruner``, the tokens to keep per image (``counts``, from each image's full layout) and, with merging,
        how many tokens each of the call's tokens already stands for (``prior`` [b, L], earlier cuts' merges). Where
        the site read the rows' text counts beforehand (``spans.text_counts``), nothing here reads the device: the
        plan's row lengths follow from them and the budgets, and the selections' contract checks are read after the
        language model ran (:meth:`check_selections`)."""
        pruner = self.pruner if pruner is None else pruner
        reuse = None if self._reuse is None else self._reuse.get(stage)
        replacements: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        sizes: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        merging = self.config.merge == "proportional"
        keep = ~spans.image_mask(real.shape)  # visual tokens join as they are kept
        pruned_any = False
        known = spans.text_counts
        kept_per_item: list[int] = []
        selections: list[Selection] = []
        for i, (row, pos, layout) in enumerate(zip(spans.rows, spans.positions, spans.layouts)):
            n = pos.numel()
            k = min(pruner.count(layout) if counts is None else counts[i], n)
            pruned_any |= k < n
            if k >= n and isinstance(pruner.config.keep, float):  # keep=1.0: nothing to choose, no pruner runs
                sel = Selection(indices=torch.arange(n, device=pos.device))
            elif reuse is not None and i < len(reuse):
                sel = reuse[i]
            else:
                text = functools.partial(_text_states, states, spans, real, row)
                view = VisualView(features=states[row, pos], text=text, layout=layout, site=self.config.site,
                                  layer=pruner.config.layer, sample=row, image=i, extras=spans.extras[i])
                check = Selection.check if known is None else self._check_later
                sel = (select_per_frame(pruner, view, k, check) if self.config.per_frame and layout.is_video
                       else pruner.select(view, k))
                check(sel, n, k)
            kept_per_item.append(k)
            if merging:
                sel = merge_dropped(states[row, pos], sel, None if prior is None else prior[row, pos])
            kept = pos[on_device(sel.indices, pos.device)]
            keep[row].index_fill_(0, kept, True)
            if sel.embeddings is not None:
                replacements.append((row, kept, sel.embeddings))
            if merging and sel.sizes is not None:
                sizes.append((row, kept, sel.sizes))
            if stage == 0:
                self.recorder.add_image(row, n, k)
            else:
                self.recorder.restage(i, k)
            selections.append(sel)
        self.recorder.stage += 1
        if self._prefix is not None and self._in_prefill:
            if stage == 0 or self._memo is None:
                self._memo = (*self._prefix, {})
            self._memo[2][stage] = selections
        if pruned_any:  # drop the batch's original padding too; rows are re-padded to the new longest row
            keep &= real
        counts = None
        if known is not None:  # a row keeps its text and its items' budgets, or (nothing pruned) every token
            counts = list(known) if pruned_any else [real.shape[1]] * len(known)
            if pruned_any:
                for row, k in zip(spans.rows, kept_per_item):
                    counts[row] += k
            self._defer_count_check(keep, counts)
        # merged sizes exceed 1 where a merging cut dropped tokens or an earlier cut merged some (the sizes add up)
        merged = bool(sizes) and (pruned_any or prior is not None)
        plan = KeepPlan.from_keep_mask(keep, replacements, sizes, counts, merged)
        plan.item_counts = kept_per_item
        return plan

    def _check_later(self, sel: Selection, n: int, k: int) -> None:
        """:meth:`Selection.check` with its device checks read after the language model ran
        (:meth:`check_selections`), for a cut inside the decoder layers; the shape checks run now."""
        sel.check_shapes(k)
        bad = sel.broken(n)
        if bad is not None:
            self._unchecked.append((bad, functools.partial(sel.explain, n)))

    def _defer_count_check(self, keep: torch.Tensor, counts: list[int]) -> None:
        """Check after the language model ran that each row's surviving tokens number what its plan was sized for
        (text count + budgets): a plan built on a wrong count would silently drop or repeat tokens."""
        found = keep.sum(1)  # compared with host ints one row at a time: a host-to-device copy would sync
        bad = found.ne(counts[0]).any() if len(set(counts)) == 1 else torch.stack(
            [f.ne(c) for f, c in zip(found.unbind(), counts)]).any()

        def explain() -> None:
            raise VTPruneError(f"keep plan sized for {counts} tokens per row, but the selections kept "
                               f"{found.tolist()}: the rows' text counts read before layer 0 do not match the call")

        self._unchecked.append((bad, explain))

    # ---- stats --------------------------------------------------------------------------------------
    def _record_layer(self, module, args, kwargs):
        if self._in_prefill:
            self.recorder.layer((args[0] if args else kwargs["hidden_states"]).shape[1])
        return None
