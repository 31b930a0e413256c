"""Capture: the signals a pruner can ask for in ``Pruner.needs``, their types, and the hooks that capture them.

Pre-hooks on an attention module remember its inputs during the forward; q/k are then recomputed from
them for exactly the tokens a pruner needs (SDPA / FlashAttention keep running untouched). Adapters
know the per-family projection and position details; this module holds the family-free pieces and
:class:`Signals`, which installs the hooks for one engine and turns what they captured into per-image
``VisualView.extras``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .config import PrunerConfig
from .errors import VTPruneError

#: what a pruner may declare in ``Pruner.needs``
LLM_QK = "llm_qk"  # post-RoPE q/k of decoder layer K-1 (in-LLM site)
VISION_QK = "vision_qk"  # q/k of vision-encoder attention layers (``Pruner.vision_layers``)
PROJECTOR = "projector"  # the projector's inputs per visual token, and the projector itself
FINAL_NORM = "final_norm"  # the language model's final norm (DART compares final-normed hidden states)
HINTS = "hints"  # per-sample values the caller passes with ``PruneHandle.set_hints`` (informed references)
LAYER_QK = "layer_qk"  # post-RoPE q/k that decoder layer K itself would compute on its input (PyramidDrop)
LM_INPUT = "lm_input"  # the input states of decoder layer 0 (SparseVLM's raters; in-LLM site)
NEEDS = (LLM_QK, VISION_QK, PROJECTOR, FINAL_NORM, HINTS, LAYER_QK, LM_INPUT)


@dataclass
class LLMQK:
    """Post-RoPE query/key of decoder layer K-1 for one sample's real (non-padding) tokens.

    query [H, n, hd], key [H_kv, n, hd] (GQA: heads share keys in groups of H // H_kv);
    image [V]: where this image's tokens sit among the n tokens; text [T]: where the rows of
    ``VisualView.text`` sit among them; the last prompt token is index n-1.
    """

    query: torch.Tensor
    key: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor
    scaling: float
    #: the layer's sliding window (``None``: full attention): query i sees only keys j with i - j < window
    window: int | None = None
    #: how many of the last rows of ``text`` follow the image, when known on the host (``None``: not known)
    text_after: int | None = None


@dataclass
class LMInput:
    """The input states of decoder layer 0 (the LM's input embeddings, as that layer sees them) for one sample's
    real tokens, captured in the prefill of a call with images: states [n, D]; image [V] and text [T] as in
    :class:`LLMQK` (the whole image and every non-visual token, whatever later cuts prune)."""

    states: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor
    #: how many of the last rows of ``text`` follow the image, when known on the host (``None``: not known)
    text_after: int | None = None


def text_after_image(signal: LLMQK | LMInput) -> torch.Tensor:
    """Rows of ``signal.text`` (the sample's non-visual tokens) that follow its image in the sequence: the last
    ``signal.text_after`` rows when the site counted them (no host read), else found here (a read)."""
    if signal.text_after is not None:
        t = signal.text.numel()
        return torch.arange(t - signal.text_after, t, device=signal.text.device)
    return (signal.text > signal.image.max()).nonzero().flatten()


@dataclass
class VisionQK:
    """Query/key of one vision-encoder attention layer for one encoder view of an image.

    query/key [H, P, hd] for the view's P patches (no [CLS]); cls_query/cls_key [H, hd] when the encoder
    has a [CLS] token (CLIP), else ``None``. token_of_patch [P]: the image's visual-token index (0..V-1)
    each patch ends up in (several patches share one token after a 2x2 merge; -1 where LLaVA-NeXT's
    unpadding drops the patch).
    """

    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    token_of_patch: torch.Tensor
    cls_query: torch.Tensor | None = None
    cls_key: torch.Tensor | None = None


@dataclass
class ProjectorInput:
    """What the multimodal projector (LLaVA MLP / Qwen 2x2 PatchMerger) turned into one image's tokens.

    inputs [V, g, d_v]: the g encoder features feeding each visual token (g = 1 for LLaVA, 4 for a 2x2
    merge); valid [V]: tokens that have projector inputs (LLaVA-NeXT newline tokens do not);
    project: maps [n, g, d_v] -> [n, D], exactly as the model does; exact [V]: the valid tokens whose
    re-projection is the model's visual token itself (``None``: all of them; LLaVA-OneVision's anyres-max
    resized tokens blend several patches after the projector, and their input is their nearest source's).
    """

    inputs: torch.Tensor
    valid: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]
    mlp: "MLPProjector | None" = None
    exact: torch.Tensor | None = None


@dataclass
class MLPProjector:
    """The structure of a ``Linear -> activation -> Linear`` projector (LLaVA's), for estimators that can
    exploit it (the first layer is linear in its input, the last is an isometry up to its singular values).
    ``norm``: a LayerNorm or RMSNorm applied before the first layer to each of its width's slices of a token's
    concatenated inputs (Qwen's PatchMerger: each of the 4 patch vectors; InternVL's projector: all 4 at once), or
    ``None``."""

    first: torch.nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    last: torch.nn.Linear
    norm: torch.nn.Module | None = None


def per_vector_norm(norm: Any) -> bool:
    """Whether ``norm`` is a LayerNorm or an RMSNorm (a ``weight`` and a float ``variance_epsilon``, as transformers'
    own) that :attr:`MLPProjector.norm` can describe."""
    return isinstance(norm, torch.nn.LayerNorm) or (isinstance(getattr(norm, "weight", None), torch.Tensor)
                                                    and isinstance(getattr(norm, "variance_epsilon", None), float))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding (rotate-half convention) to x [..., n, hd] with cos/sin broadcastable."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class InputCapture:
    """A forward pre-hook that keeps the (args, kwargs) of the module's last call while armed."""

    def __init__(self, armed: bool = False) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.armed = armed

    def __call__(self, module, args, kwargs) -> None:
        if self.armed:
            self.calls.append((args, kwargs))

    def reset(self) -> None:
        self.calls = []

    def tensor(self, name: str, position: int = 0, call: int = -1) -> torch.Tensor:
        """The named input of a captured call (looked up in kwargs first, then positionally)."""
        args, kwargs = self.calls[call]
        return kwargs[name] if name in kwargs else args[position]


#: how :class:`Signals` registers a pre-hook (the engine's, so that ``remove()`` drops it)
HookFn = Callable[[nn.Module, Callable], None]


class Signals:
    """The captures of one engine: decoder layer K-1's attention inputs, vision-encoder attention inputs,
    the projector's inputs, and the vision tower's own inputs (which mark a new encoding pass). ``adapter`` is a
    :class:`vtprune.models.base.ModelAdapter`, ``pruner`` a :class:`vtprune.methods.base.Pruner` and ``spans``
    an :class:`vtprune.models.base.ImageSpans`; typed ``Any`` because both of those modules import this one."""

    def __init__(self, adapter: Any, pruner: Any, config: PrunerConfig) -> None:
        self.adapter, self.pruner, self.config = adapter, pruner, config
        self.needs = frozenset(pruner.needs)
        self.llm: InputCapture | None = None
        self.lm_input: InputCapture | None = None
        self.tower: InputCapture | None = None
        self.vision: dict[int, InputCapture] = {}
        self.projector: InputCapture | None = None
        self._consumed = True  # the last encoding pass was used by a prefill
        self.hints: list[Any] | None = None  # one caller-given value per batch row (``HINTS``)

    @property
    def reads_decoder_qk(self) -> bool:
        """Whether the pruner reads decoder-layer q/k (:class:`LLMQK` extras)."""
        return bool(self.needs & {LLM_QK, LAYER_QK})

    def check(self) -> None:
        """Refuse signals that do not exist or cannot be had at this site, before any hook goes in."""
        name = self.config.name
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise VTPruneError(f"pruner {name!r} needs unknown signals {sorted(unknown)}; known: {NEEDS}")
        if self.needs & {LLM_QK, LAYER_QK, LM_INPUT} and self.config.site != "layer":
            raise VTPruneError(f"pruner {name!r} reads decoder-layer attention, so it needs site='layer'")

    def install(self, hook_pre: HookFn) -> None:
        """Register the capture pre-hooks through the engine's ``hook_pre`` (so ``remove()`` drops them)."""
        a = self.adapter
        if LLM_QK in self.needs:
            self.llm = InputCapture()
            hook_pre(a.llm_attention(self.config.layer - 1), self.llm)
        if LM_INPUT in self.needs:
            self.lm_input = InputCapture()
            hook_pre(a.layers[0], self.lm_input)
        if VISION_QK in self.needs or PROJECTOR in self.needs:
            self.tower = InputCapture(armed=True)
            hook_pre(a.vision_tower, self._encoding_pass_starts)
        if VISION_QK in self.needs:
            n = a.num_vision_layers
            for layer in sorted({l % n for l in self.pruner.vision_layers(a.vision_full_attention_layers(), n)}):
                self.vision[layer] = InputCapture(armed=True)
                hook_pre(a.vision_attention(layer), self.vision[layer])
        if PROJECTOR in self.needs:
            self.projector = InputCapture(armed=True)
            hook_pre(a.projector, self.projector)

    def _encoding_pass_starts(self, module, args, kwargs) -> None:
        """A new vision-encoder pass: forget the previous pass's inputs once a prefill has used them
        (``generate`` encodes once, before its first forward; uncached steps reuse that encoding)."""
        if self._consumed:
            for cap in (self.tower, self.projector, *self.vision.values()):
                if cap is not None:
                    cap.reset()
            self._consumed = False
        self.tower(module, args, kwargs)

    def begin_prefill(self) -> None:
        for cap in (self.llm, self.lm_input):
            if cap is not None:
                cap.reset()
                cap.armed = True

    def end_prefill(self) -> None:
        for cap in (self.llm, self.lm_input):
            if cap is not None:
                cap.armed = False

    def image_extras(self, spans: Any, batch: int) -> list[dict[str, Any]]:
        """Per image of a ``batch``-row prefill: {"vision_qk": {layer: [VisionQK per encoder view]}, "projector":
        ProjectorInput, "final_norm": module, "hint": its row's hint, "hint_image": the image's index within its
        row}, for whichever the pruner asked for. Hints must come one per row: a count that does not match the
        batch (e.g. left over from another batch) is an error, never a silent shift."""
        extras: list[dict[str, Any]] = [{} for _ in range(len(spans))]
        if HINTS in self.needs and self.hints is not None:
            if len(self.hints) != batch:
                raise VTPruneError(f"pruner {self.config.name!r}: {len(self.hints)} hint(s) set for a batch of "
                                   f"{batch} row(s); call handle.set_hints with one per row before each forward")
            nth: dict[int, int] = {}
            for ex, row in zip(extras, spans.rows):
                ex["hint"], ex["hint_image"] = self.hints[row], nth.get(row, 0)
                nth[row] = nth.get(row, 0) + 1
        if FINAL_NORM in self.needs:
            for ex in extras:
                ex["final_norm"] = self.adapter.language_model.norm
        if self.tower is None:
            return extras
        if not self.tower.calls:
            raise VTPruneError(f"pruner {self.config.name!r} needs the vision encoder's signals, but no encoder "
                               "pass was seen (were pre-computed image features passed in?)")
        self._consumed = True
        for layer, cap in self.vision.items():
            per_image = self.adapter.vision_qk(layer, cap, self.tower, spans.layouts)
            for ex, views in zip(extras, per_image):
                ex.setdefault("vision_qk", {})[layer] = views
        if self.projector is not None:
            per_image = self.adapter.projector_inputs(self.projector, self.tower, spans.layouts)
            for ex, proj in zip(extras, per_image):
                ex["projector"] = proj
        return extras

    def for_cut(self, config: PrunerConfig) -> Signals:
        """The signals of a later cut of a multi-stage schedule (at ``config.layer``): decoder q/k only (the other
        signals are the call's, restricted to the survivors). Hints come per token of the whole image, which a later
        cut cannot index, so a pruner that reads them is refused."""
        if HINTS in self.needs:
            raise VTPruneError(f"pruner {self.config.name!r} reads caller hints given per token of the whole image, "
                               "which later cuts of a schedule (seeing only the surviving tokens) cannot index; "
                               "use one cut")
        return Signals(self.adapter, SimpleNamespace(needs=self.needs & {LLM_QK, LAYER_QK}), config)

    def check_cut(self, layer: int) -> None:
        """Refuse a cut at decoder ``layer`` whose own attention the pruner reads (``LAYER_QK``) when that layer has
        none (a linear-attention layer)."""
        if LAYER_QK in self.needs and layer in self.adapter.recurrent_layers:
            raise VTPruneError(f"pruner {self.config.name!r} reads the attention decoder layer K itself computes, but "
                               f"layer {layer} is a linear-attention layer with no attention map; cut at "
                               "full-attention layers")

    def add_layer_qk(self, layer: int, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                     spans: Any, real: torch.Tensor) -> None:
        """For ``LAYER_QK`` pruners: the post-RoPE q/k decoder ``layer`` would compute on its input ``hidden`` (its
        ``input_layernorm``, projections and RoPE at ``position_embeddings``), recomputed outside the layer."""
        if LAYER_QK not in self.needs:
            return
        capture = InputCapture(armed=True)
        capture(None, (), {"hidden_states": self.adapter.layers[layer].input_layernorm(hidden),
                           "position_embeddings": position_embeddings})
        q, k, scaling = self.adapter.llm_qk(layer, capture)
        add_qk_extras(LAYER_QK, q, k, scaling, self.adapter.llm_window(layer), spans, real)

    def add_llm_extras(self, spans: Any, real: torch.Tensor) -> None:
        """Attach layer K-1's post-RoPE q/k (the sample's real tokens) and, for ``LM_INPUT`` pruners, decoder layer
        0's input states to each image's extras (the first cut's extras; later cuts keep ``lm_input`` unrestricted)."""
        if self.lm_input is not None and self.lm_input.calls:
            states = self.lm_input.tensor("hidden_states")
            rank = real.long().cumsum(1) - 1
            for ex, row, pos, text_after in zip(spans.extras, spans.rows, spans.positions, spans.items_text_after()):
                ex[LM_INPUT] = LMInput(states=states[row][real_index(spans, real, row)], image=rank[row, pos],
                                       text=rank[row, spans.text_index(real, row)], text_after=text_after)
        if self.llm is None:
            return
        q, k, scaling = self.adapter.llm_qk(self.config.layer - 1, self.llm)
        add_qk_extras(LLM_QK, q, k, scaling, self.adapter.llm_window(self.config.layer - 1), spans, real)


def add_qk_extras(key: str, q: torch.Tensor, k: torch.Tensor, scaling: float, window: int | None, spans: Any,
                  real: torch.Tensor) -> None:
    """Attach post-RoPE q [b, H, L, hd] / k [b, H_kv, L, hd] of a call's L tokens (``real`` [b, L]) to each image's
    extras under ``key``, as :class:`LLMQK` over its sample's real tokens."""
    rank = real.long().cumsum(1) - 1
    for ex, row, pos, text_after in zip(spans.extras, spans.rows, spans.positions, spans.items_text_after()):
        idx = real_index(spans, real, row)
        ex[key] = LLMQK(query=q[row][:, idx], key=k[row][:, idx], image=rank[row, pos],
                        text=rank[row, spans.text_index(real, row)], scaling=scaling, window=window,
                        text_after=text_after)


def real_index(spans: Any, real: torch.Tensor, row: int) -> torch.Tensor:
    """Sequence indices of ``row``'s real tokens (``real`` [b, L]). Where the site read each row's text count before
    the decoder layers (``spans.text_counts``), found without a host read: they are the row's text and its items'
    tokens."""
    if spans.text_counts is None:
        return real[row].nonzero().flatten()
    n = spans.text_counts[row] + sum(p.numel() for r, p in zip(spans.rows, spans.positions) if r == row)
    return torch.nonzero_static(real[row], size=n, fill_value=0).flatten()
