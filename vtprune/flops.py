"""FLOPs accounting for (pruned) VLM runs, in two conventions.

**FastV convention** (``FlopsReport.fastv``; docs/algorithms.md, "Costs and FLOPs"): LLM prefill only, per decoder
layer with ``n`` tokens ``4nd² + 2n²d + 2ndm``, summed over layers and samples. Comparable with the tables of
FastV, DivPrune, VisionZip, ZOO-Prune and DART. Its terms are multiply-accumulates and it assumes a two-matrix
FFN; papers call the result "FLOPs", and so does this module, but it is *not* comparable with the exact count below.

**Architecture-exact count** (``FlopsReport.prefill`` / ``decode``): one multiply-add = 2 FLOPs, counted exactly
where :class:`torch.utils.flop_counter.FlopCounterMode` counts — matrix products, convolutions and attention
kernels — so that the two agree on a real forward (``tests/test_flops.py`` checks it on every family):

* ``llm_linear``: Q/O projections ``d × h·d_h``, K/V projections ``d × n_kv·d_h`` (GQA), gated FFN ``3·d·m``;
* ``llm_attention``: ``QKᵀ`` and ``AV``, ``4·h·d_h·s_q·s_k`` per layer. By default the **full** ``s_q × s_k``
  rectangle is counted, which is what SDPA math/flash kernels and ``FlopCounterMode`` report; ``causal=True``
  counts only the causal triangle (the work an ideal causal kernel must do, about half at prefill);
* ``vision``: patch-embedding convolution, every encoder layer (LLaVA runs all CLIP layers even though it reads
  ``hidden_states[-2]``), per-frame full attention and Qwen2.5-VL's window attention with the real window sizes;
* ``projector``: LLaVA's 2-layer MLP (on *all* LLaVA-NeXT views, before unpadding) or Qwen's PatchMerger;
* ``lm_head``: ``2·d·vocab`` per position whose logits are computed (``logits_to_keep``: 0 = every position, as
  in a plain forward; ``generate`` passes 1);
* decode step ``t`` (1-based): one token per sample, attending to ``L_l + t`` keys at layer ``l``, where ``L_l`` is
  the prefill length of layer ``l`` (its KV-cache length), plus its LM head.

Not counted (in neither convention, as in ``FlopCounterMode``): norms, activations, softmax, rotary embeddings,
residual adds, biases, embeddings lookups, scatter/gather of the pruning hooks. These are O(n·d) each.

**Pruner overhead** (``FlopsReport.overhead``) is reported separately: each method's class gives a formula in
its ``overhead_flops`` classmethod; ``None`` means it has none (unknown, not zero).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import VTPruneError
from .models import FAMILIES, VisionWork, family_class
from .registry import pruner_class
from .stats import PruneStats

#: exact-count components, in report order
PREFILL_PARTS = ("vision", "projector", "llm_linear", "llm_attention", "lm_head")
DECODE_PARTS = ("llm_linear", "llm_attention", "lm_head")


# ---- model dimensions ---------------------------------------------------------------------------------
def _config_of(model_or_config: Any) -> Any:
    """The transformers config behind a model or config object."""
    return model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config


@dataclass(frozen=True)
class LLMDims:
    """Decoder hyper-parameters the formulas need (a LLaMA/Qwen2-style decoder with a gated FFN)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, model_or_config: Any) -> LLMDims:
        """Read the text config of a VLM config, or a text config itself (anything with the LLaMA field names)."""
        cfg = _config_of(model_or_config)
        text = getattr(cfg, "text_config", None) or cfg
        names = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [n for n in names if getattr(text, n, None) is None]
        if missing:
            raise VTPruneError(f"{type(text).__name__} lacks {missing}: pass a decoder (text) config or the config "
                               f"of one of {FAMILIES}")
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads, kv_heads=kv,
                   head_dim=head_dim, intermediate=text.intermediate_size, vocab=text.vocab_size)

    def linear_per_token(self) -> int:
        """FLOPs of one decoder layer's projections and gated FFN for one token."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * (2 * d * q + 2 * d * kv + 3 * d * self.intermediate)

    def attention(self, queries: int, keys: int) -> int:
        """FLOPs of QKᵀ and AV of one layer for ``queries × keys`` (all heads)."""
        return 4 * self.heads * self.head_dim * queries * keys

    def prefill_attention(self, n: int, causal: bool) -> int:
        """Attention FLOPs of one layer over ``n`` prompt tokens: the full ``n × n`` rectangle, or only the
        ``n(n+1)/2`` causal query-key pairs."""
        return 2 * self.heads * self.head_dim * n * (n + 1) if causal else self.attention(n, n)


def layer_cost(model_or_config: Any, causal: bool = False) -> Callable[[int, int, int], tuple[int, int]]:
    """``cost(layer, queries, keys) -> (llm_linear, llm_attention)`` FLOPs of one decoder layer for ``queries`` new
    tokens of one sequence whose cache holds ``keys`` after them (``keys == queries``: a prefill). The family's
    ``ModelAdapter.llm_layer_flops`` describes its layers (linear attention, gated queries, MoE); families without
    one, and bare decoder configs, get the LLaMA/Qwen2 formula of :class:`LLMDims`."""
    cfg = _config_of(model_or_config)
    dims = LLMDims.from_config(cfg)
    try:
        family = family_class(getattr(cfg, "model_type", None))
    except VTPruneError:
        family = None
    per_token = dims.linear_per_token()

    def cost(layer: int, queries: int, keys: int) -> tuple[int, int]:
        own = None if family is None else family.llm_layer_flops(cfg, layer, queries, keys, causal)
        if own is not None:
            return own
        mixing = dims.prefill_attention(queries, causal) if queries == keys else dims.attention(queries, keys)
        return per_token * queries, mixing
    return cost


def fastv_layer_flops(n: int, d: int, m: int) -> int:
    """FastV's per-layer cost ``4nd² + 2n²d + 2ndm`` (multiply-accumulates, two-matrix FFN)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def fastv_flops(model_or_config: Any, layer_seq_lens: Sequence[int]) -> int:
    """FastV-convention prefill cost of one sample whose decoder layer ``l`` processed ``layer_seq_lens[l]`` tokens."""
    dims = LLMDims.from_config(model_or_config)
    if len(layer_seq_lens) != dims.layers:
        raise VTPruneError(f"got {len(layer_seq_lens)} per-layer lengths for a {dims.layers}-layer decoder")
    return sum(fastv_layer_flops(n, dims.hidden, dims.intermediate) for n in layer_seq_lens)


def pdrop_layer_flops(n: int, d: int, m: int) -> int:
    """PyramidDrop's per-layer cost ``4nd² + 2n²d + 3ndm`` (gated FFN) of ``n`` tokens; its tables count visual
    tokens only (``n`` = the layer's visual tokens)."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def pdrop_flops(layer_visual: Sequence[int], d: int, m: int) -> int:
    """PyramidDrop-convention prefill cost of one sample whose decoder layer ``l`` processed ``layer_visual[l]``
    visual tokens (``SampleStats.layer_visual``): LLaVA-1.5-7B gives 3.82 T unpruned, 1.78 T for cuts at 8/16/24
    with λ = 0.5 (its paper's table)."""
    return sum(pdrop_layer_flops(n, d, m) for n in layer_visual)


def stage_flops(model_or_config: Any, stats: PruneStats, causal: bool = False) -> list[dict[str, Any]]:
    """The last prefill's LLM FLOPs per stage of a (multi-stage) schedule, summed over the batch's real tokens: one
    entry per run of decoder layers whose visual token counts are the same for every sample, with ``layers``
    (first, end), ``visual`` (per sample), the exact ``llm_linear``/``llm_attention`` (as :func:`count_flops`),
    and the ``fastv`` and ``pdrop`` conventions."""
    if not stats.samples:
        raise VTPruneError("these stats hold no prefill yet: run the model once with the handle installed")
    dims = LLMDims.from_config(model_or_config)
    cost = layer_cost(model_or_config, causal)
    per_layer = [tuple(s.layer_visual[layer] for s in stats.samples) for layer in range(dims.layers)]
    starts = [0] + [layer for layer in range(1, dims.layers) if per_layer[layer] != per_layer[layer - 1]]
    out = []
    for start, end in zip(starts, starts[1:] + [dims.layers]):
        entry: dict[str, Any] = {"layers": (start, end), "visual": list(per_layer[start]), "llm_linear": 0,
                                 "llm_attention": 0, "fastv": 0, "pdrop": 0}
        for s in stats.samples:
            for layer in range(start, end):
                n = s.layer_seq_lens[layer]
                linear, mixing = cost(layer, n, n)
                entry["llm_linear"] += linear
                entry["llm_attention"] += mixing
                entry["fastv"] += fastv_layer_flops(n, dims.hidden, dims.intermediate)
                entry["pdrop"] += pdrop_layer_flops(s.layer_visual[layer], dims.hidden, dims.intermediate)
        out.append(entry)
    return out


# ---- vision side (each family's formula: vtprune.models) ----------------------------------------------
def _family_of(cfg: Any) -> type:
    """The registered family of a VLM config, by its ``model_type``."""
    kind = getattr(cfg, "model_type", None)
    try:
        return family_class(kind)
    except VTPruneError:
        raise VTPruneError(f"no vision FLOPs formula for model_type={kind!r}; supported: {FAMILIES}") from None


def vision_work(model_or_config: Any, inputs: Mapping[str, Any]) -> VisionWork:
    """What the vision encoder processes for the keyword arguments a model is called with (processor outputs)."""
    cfg = _config_of(model_or_config)
    return _family_of(cfg).vision_work(cfg, inputs)


def vision_flops(model_or_config: Any, work: VisionWork) -> dict[str, int]:
    """Exact FLOPs of the vision encoder and the projector/merger for ``work``."""
    cfg = _config_of(model_or_config)
    return _family_of(cfg).vision_flops(cfg, work)


# ---- pruner overhead ----------------------------------------------------------------------------------
#: per-image overhead formula: (visual tokens before, tokens kept, feature dim) -> FLOPs
OverheadFormula = Callable[[int, int, int], "int | None"]


def register_overhead_flops(name: str) -> Callable[[OverheadFormula], OverheadFormula]:
    """Deprecated decorator: make ``fn`` the ``overhead_flops`` of the registered pruner ``name`` (define an
    ``overhead_flops`` classmethod on the pruner class instead)."""
    warnings.warn("register_overhead_flops is deprecated; define Pruner.overhead_flops on the pruner class",
                  DeprecationWarning, stacklevel=2)

    def deco(fn: OverheadFormula) -> OverheadFormula:
        pruner_class(name).overhead_flops = classmethod(lambda cls, before, kept, dim: fn(before, kept, dim))
        return fn
    return deco


def pruner_overhead_flops(name: str, images: Sequence[tuple[int, int]], dim: int) -> int | None:
    """Selection FLOPs of pruner ``name`` over ``images`` [(before, kept)] by its class's ``overhead_flops``;
    ``None`` if the name is not registered or the class gives no formula. Images that kept every token were
    not given to the pruner and cost nothing."""
    try:
        cls = pruner_class(name)
    except VTPruneError:
        return None
    costs = [cls.overhead_flops(before, kept, dim) for before, kept in images if kept < before]
    return None if None in costs else sum(costs)


# ---- the report ---------------------------------------------------------------------------------------
@dataclass
class FlopsReport:
    """FLOPs of one prefill (+ decode steps), summed over the batch.

    fastv:      FastV-convention prefill cost (LLM layers only, real tokens, multiply-accumulates).
    prefill:    exact prefill FLOPs by component (see :data:`PREFILL_PARTS`); vision parts are 0 when unknown.
    decode:     exact FLOPs of every decode step, by component (:data:`DECODE_PARTS`).
    overhead:   pruner selection FLOPs (``None`` = the pruner reports no formula).
    """

    fastv: int
    prefill: dict[str, int]
    decode: list[dict[str, int]] = field(default_factory=list)
    overhead: int | None = 0
    layer_seq_lens: list[list[int]] = field(default_factory=list)
    vision_counted: bool = True
    causal: bool = False

    @property
    def fastv_tflops(self) -> float:
        return self.fastv / 1e12

    @property
    def prefill_total(self) -> int:
        """Exact prefill FLOPs including the pruner's overhead (when known)."""
        return sum(self.prefill.values()) + (self.overhead or 0)

    @property
    def prefill_tflops(self) -> float:
        return self.prefill_total / 1e12

    @property
    def decode_per_step(self) -> list[int]:
        return [sum(step.values()) for step in self.decode]

    @property
    def decode_total(self) -> int:
        return sum(self.decode_per_step)

    @property
    def total(self) -> int:
        return self.prefill_total + self.decode_total

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (TFLOPs as floats, components as ints)."""
        return {
            "fastv_tflops": self.fastv_tflops, "prefill_tflops": self.prefill_tflops, "prefill": dict(self.prefill),
            "overhead": self.overhead, "decode_steps": len(self.decode), "decode_total": self.decode_total,
            "decode_per_step": self.decode_per_step, "total": self.total, "vision_counted": self.vision_counted,
            "causal": self.causal, "layer_seq_lens": self.layer_seq_lens,
        }


def count_flops(model_or_config: Any, layer_seq_lens: Sequence[Sequence[int]], *,
                fastv_lens: Sequence[Sequence[int]] | None = None, vision: VisionWork | None = None,
                logits_to_keep: int = 1, decode_steps: int = 0, overhead: int | None = 0,
                causal: bool = False) -> FlopsReport:
    """Count a prefill whose sample ``i`` ran decoder layer ``l`` on ``layer_seq_lens[i][l]`` tokens (its KV length
    afterwards), followed by ``decode_steps`` one-token steps. ``fastv_lens`` (default: the same) are the real
    token counts for the FastV convention; ``vision=None`` leaves the vision encoder and projector out."""
    dims = LLMDims.from_config(model_or_config)
    if logits_to_keep < 0 or decode_steps < 0:
        raise VTPruneError(f"logits_to_keep ({logits_to_keep}) and decode_steps ({decode_steps}) must be >= 0")
    for lens in layer_seq_lens:
        if len(lens) != dims.layers:
            raise VTPruneError(f"got {len(lens)} per-layer lengths for a {dims.layers}-layer decoder")
    parts = dict.fromkeys(PREFILL_PARTS, 0)
    if vision is not None:
        parts.update(vision_flops(model_or_config, vision))
    cost = layer_cost(model_or_config, causal)
    for lens in layer_seq_lens:
        for layer, n in enumerate(lens):
            linear, mixing = cost(layer, n, n)
            parts["llm_linear"] += linear
            parts["llm_attention"] += mixing
        logit_rows = lens[-1] if logits_to_keep == 0 else min(logits_to_keep, lens[-1])
        parts["lm_head"] += 2 * dims.hidden * dims.vocab * logit_rows
    batch = len(layer_seq_lens)
    decode = []
    for t in range(1, decode_steps + 1):
        steps = [cost(layer, 1, n + t) for lens in layer_seq_lens for layer, n in enumerate(lens)]
        decode.append(dict(zip(DECODE_PARTS, (sum(s[0] for s in steps), sum(s[1] for s in steps),
                                              2 * dims.hidden * dims.vocab * batch))))
    real = layer_seq_lens if fastv_lens is None else fastv_lens
    fastv = sum(fastv_flops(model_or_config, lens) for lens in real)
    return FlopsReport(fastv=fastv, prefill=parts, decode=decode, overhead=overhead,
                       layer_seq_lens=[list(x) for x in layer_seq_lens], vision_counted=vision is not None,
                       causal=causal)


def flops_from_stats(model_or_config: Any, stats: PruneStats, *, inputs: Mapping[str, Any] | None = None,
                     decode_steps: int | None = None, logits_to_keep: int = 1, padded: bool = False,
                     pruner: str | None = None, causal: bool = False) -> FlopsReport:
    """FLOPs of the prefill recorded in ``stats`` (``handle.stats``) and of ``decode_steps`` decode steps
    (default: ``stats.decode_steps``).

    inputs:  the model's keyword inputs; needed to count the vision encoder and projector (else left out).
    padded:  count what the kernels ran on (padded lengths × batch, as ``FlopCounterMode`` sees a padded batch)
             instead of each sample's real tokens. The FastV number always uses real tokens.
    pruner:  registered pruner name, to add its selection overhead (``handle.config.name``): one selection per
             image per cut of a multi-stage schedule, each on the tokens the cut saw.
    """
    if not stats.samples:
        raise VTPruneError("these stats hold no prefill yet: run the model once with the handle installed")
    real = [s.layer_seq_lens for s in stats.samples]
    lens = [stats.padded_layer_seq_lens] * len(real) if padded else real
    overhead = 0
    if pruner is not None:
        cuts = [cut for s in stats.samples for cut in (s.image_cuts or [list(im) for im in s.images])]
        images = [(cut[i], cut[i + 1]) for cut in cuts for i in range(len(cut) - 1)]
        overhead = pruner_overhead_flops(pruner, images, LLMDims.from_config(model_or_config).hidden)
    return count_flops(model_or_config, lens, fastv_lens=real,
                       vision=None if inputs is None else vision_work(model_or_config, inputs),
                       logits_to_keep=logits_to_keep,
                       decode_steps=stats.decode_steps if decode_steps is None else decode_steps,
                       overhead=overhead, causal=causal)


def flops_unpruned(model_or_config: Any, inputs: Mapping[str, Any], *, decode_steps: int = 0,
                   logits_to_keep: int = 1, padded: bool = False, causal: bool = False) -> FlopsReport:
    """FLOPs of the unpruned model on ``inputs`` (every layer sees the whole prompt), vision included."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise VTPruneError("inputs need input_ids to count the unpruned prefill")
    mask = inputs.get("attention_mask")
    real = [ids.shape[1]] * ids.shape[0] if mask is None else [int(x) for x in mask.sum(1).tolist()]
    layers = LLMDims.from_config(model_or_config).layers
    lens = [[ids.shape[1]] * layers] * ids.shape[0] if padded else [[n] * layers for n in real]
    return count_flops(model_or_config, lens, fastv_lens=[[n] * layers for n in real],
                       vision=vision_work(model_or_config, inputs), logits_to_keep=logits_to_keep,
                       decode_steps=decode_steps, causal=causal)


# ---- measuring ----------------------------------------------------------------------------------------
def flop_counter(display: bool = False) -> torch.utils.flop_counter.FlopCounterMode:
    """A ``FlopCounterMode`` that also counts PyTorch's CPU flash-attention kernel (not registered upstream, so
    SDPA on CPU would otherwise count as zero); same formula as the CUDA SDPA kernels (full ``s_q × s_k``). It also
    counts ``torch._grouped_mm`` (transformers' default MoE experts kernel, likewise unregistered): 2·K per output
    element, i.e. each token through the experts it was routed to."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(q_shape, k_shape, v_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    def grouped_mm(a_shape, b_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        """Each output row is one row of ``a`` times one group's matrix (MoE experts as routed)."""
        return 2 * a_shape[-1] * int(torch.Size(out_shape).numel())

    return FlopCounterMode(display=display,
                           custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
                                           torch.ops.aten._grouped_mm: grouped_mm})


def measured_flops(fn: Callable[[], Any]) -> int:
    """FLOPs ``FlopCounterMode`` counts while running ``fn()`` (under ``torch.no_grad``)."""
    counter = flop_counter()
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


__all__ = [
    "DECODE_PARTS", "PREFILL_PARTS", "FlopsReport", "LLMDims", "VisionWork", "count_flops", "fastv_flops",
    "fastv_layer_flops", "flop_counter", "flops_from_stats", "flops_unpruned", "layer_cost", "measured_flops",
    "pdrop_flops", "pdrop_layer_flops", "pruner_overhead_flops", "register_overhead_flops", "stage_flops",
    "vision_flops", "vision_work",
]
