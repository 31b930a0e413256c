"""Engine overhead: the pruned prefill against the unhooked model on the hand-shortened input (issue 16).

For every family × site × keep, the ``uniform`` pruner (a lattice: no scoring cost) is applied and compared with
its *oracle*: the same model, unhooked, fed by hand the input that pruning should produce.

* pre-LLM oracle: the stock forward up to the language model (embedding, vision tower, projector, scatter,
  positions on the full sequence; stopped by an exception from a pre-hook once the LM's inputs are known), then
  the stock language model on the kept rows at their original positions, the LM head on the last position.
* in-LLM oracle (layer K): the same front half, then the stock decoder layers run by hand: layers < K on the
  full sequence, the hidden states gathered to the kept rows, layers >= K on them (rotary embedding of their
  original positions, causal SDPA), the final norm and the LM head.

Both sides are timed whole (vision + LLM): the vision work is identical and small (a 1–2 layer tower of width
256), so what differs — the engine's hooks, selection, gathers and position/mask rebuilding — is what the ratio
shows. Before timing, the pruned logits (all positions) must equal the oracle's (``assert_close`` 1e-5).
``--decode N`` also times N greedy decode steps on the pruned cache against the unhooked model decoding from a copy
of the same cache (what the short prompt's prefill writes, as the prefill check proves) with the next positions
given by hand; the logits of every step must match first. tokens/s = N ÷ the time of the N steps.
Timed call = ``use_cache=True``, logits of the last position only; warm-up, then repeats with the two sides
interleaved (order alternated: AB, BA, ...), medians. ratio = oracle time ÷ pruned time (≥ 0.97: the engine adds
≤ 3 %). ``--hooks N`` then runs N more pruned prefills per cell with every hook vtprune installed wrapped in a
timer and a ``record_function`` range: the time inside the engine's own code, per hook. Random-weight float32 SDPA models: ``bench-small``'s LLM (LLaMA/Qwen2 1024 × 8 layers, FFN 2816, vocab
32064) behind each family's vision path, ~576–602 visual tokens.

    python bench/engine_overhead.py --threads 1 --repeats 9 --out results/engine_overhead.json --markdown
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vtprune
from vtprune.benchmark import placeholder_ids, synthetic_inputs
from vtprune.measure import environment, median
from vtprune.testing import FAMILIES, shortened_lm_inputs, tiny_vlm

KEEPS = (0.5, 0.25, 0.11)
SITES = ("pre_llm", "layer")
#: ``--sites schedule``: one multi-stage cell per family, cutting the 8-layer LLM three times (PyramidDrop style)
SCHEDULE = ((2, 0.5), (4, 0.25), (6, 0.11))
PRUNER = "uniform"
#: bench-small's LLM (configs/models/bench-small.json), for every family
TEXT = {"vocab_size": 32064, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 64}
#: per family: (config overrides on top of its tiny test config, image size (H, W) of the synthetic input)
MID_SIZE: dict[str, tuple[dict[str, Any], tuple[int, int] | None]] = {
    "llava": ({"vision_feature_layer": -1, "vision_config": {
        "image_size": 336, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 1,
        "num_attention_heads": 4}},
        None),  # 24 × 24 = 576 visual tokens
    "llava_next": ({"vision_feature_layer": -1, "image_grid_pinpoints": [[196, 392], [392, 196], [392, 392]],
                    "vision_config": {"image_size": 196, "hidden_size": 256, "intermediate_size": 1024,
                                      "num_hidden_layers": 1, "num_attention_heads": 4}},
                   (196, 392)),  # base 14 × 14 + crops 14 rows × (28 + newline) = 602 visual tokens
    "qwen2_vl": ({"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [8, 12, 12]}},
                  "vision_config": {"depth": 1, "embed_dim": 256, "hidden_size": 1024, "num_heads": 4,
                                    "mlp_ratio": 4}},
                 (672, 672)),  # 48 × 48 patches merged 2 × 2 = 576 visual tokens
    "qwen2_5_vl": ({"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [8, 12, 12]}},
                    "vision_config": {"depth": 2, "hidden_size": 256, "out_hidden_size": 1024,
                                      "intermediate_size": 1024, "num_heads": 4, "window_size": 112,
                                      "fullatt_block_indexes": [1]}},
                   (672, 672)),
    "gemma3": ({"mm_tokens_per_image": 576,
                "text_config": {"sliding_window": 512, "query_pre_attn_scalar": 64},
                "vision_config": {"image_size": 336, "hidden_size": 256, "intermediate_size": 1024,
                                  "num_hidden_layers": 1, "num_attention_heads": 4}},
               None),  # 24 x 24 patches pooled 1 x 1: 576 visual tokens; a window of 512 binds in the prompt
    "internvl": ({"image_seq_length": 64, "vision_config": {"image_size": 224, "hidden_size": 256,
                                                            "intermediate_size": 1024, "num_hidden_layers": 1,
                                                            "num_attention_heads": 4}},
                 (448, 896)),  # 4 x 2 tiles of 224 px + thumbnail, 16 x 16 patches shuffled to 8 x 8: 576 tokens
    "llava_onevision": ({"image_grid_pinpoints": [[224, 224]],
                         "vision_config": {"image_size": 224, "hidden_size": 256, "intermediate_size": 1024,
                                           "num_hidden_layers": 1, "num_attention_heads": 4}},
                        (224, 224)),  # base 16 x 16 + one 16 x 16 crop with a newline per row: 528 visual tokens
    "qwen3_vl": ({"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [12, 10, 10], "mrope_interleaved": True}},
                  "vision_config": {"depth": 3, "hidden_size": 256, "out_hidden_size": 1024, "intermediate_size": 1024,
                                    "num_heads": 4, "deepstack_visual_indexes": [0, 1, 2]}},
                 (672, 672)),  # 576 visual tokens; DeepStack after decoder layers 0-2 (K=2 inside them)
    "qwen3_5": ({"text_config": {"full_attention_interval": 2, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
                                 "linear_num_key_heads": 8, "linear_num_value_heads": 16,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5, "mrope_section": [6, 5, 5],
                                                     "mrope_interleaved": True}},
                 "vision_config": {"depth": 3, "hidden_size": 256, "out_hidden_size": 1024, "intermediate_size": 1024,
                                   "num_heads": 4}},
                (768, 768)),  # 16-px patches: 576 visual tokens; linear and full layers alternate (K=2 allowed)
}
TINY_IMAGE = (112, 56)
#: each frame of ``--video-frames`` prompts: a multiple of every Qwen patch × merge unit (28 and 32)
VIDEO_FRAME = (224, 224)
ATOL = RTOL = 1e-5


class OracleMismatch(AssertionError):
    """The pruned logits differ from the hand-shortened oracle's: the timing would compare different work."""


class BenchSetupError(ValueError):
    """A bad option or a family this bench has no model size for."""


# ---- models and inputs ---------------------------------------------------------------------------------
def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, recursively for nested dicts (sub-configs)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build(family: str, tiny: bool, seed: int = 0, video_frames: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A random-weight float32 SDPA model of ``family`` and one synthetic prompt: the tiny test model, or the
    mid-size one (its tiny config with bench-small's LLM and :data:`MID_SIZE`'s vision settings); with
    ``video_frames`` a video of that many frames (each the image's size) instead of the image."""
    model = tiny_vlm(family, attn_implementation="sdpa", seed=seed).model
    image = TINY_IMAGE
    if not tiny:
        if family not in MID_SIZE:
            raise BenchSetupError(f"no mid-size config for family {family!r}: add it to MID_SIZE")
        over, image = MID_SIZE[family]
        data = _merge(model.config.to_dict(), _merge({"text_config": TEXT}, over))
        data["text_config"].pop("layer_types", None)  # derived from the layer count: let the config rebuild it
        config = type(model.config)(**{k: v for k, v in data.items() if k != "model_type"})
        torch.manual_seed(seed)
        model = type(model)._from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, synthetic_inputs(model.config, image_size=VIDEO_FRAME if video_frames else image,
                                   text_tokens=20 if tiny else 65, seed=seed, video_frames=video_frames)


def language_model(model: nn.Module) -> nn.Module:
    """The stock decoder stack of a ``*ForConditionalGeneration`` VLM."""
    return model.model.language_model


# ---- the oracle ----------------------------------------------------------------------------------------
class _Stop(Exception):
    """Ends the stock forward once the language model's inputs are known."""


def lm_inputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword inputs the unhooked model gives its language model (image features scattered into the
    embeddings, positions of the full sequence): the stock forward, stopped at the language model."""
    seen: dict[str, Any] = {}

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.update(kwargs)
        raise _Stop

    hook = language_model(model).register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(**inputs, use_cache=True)
    except _Stop:
        pass
    finally:
        hook.remove()
    return seen


def full_positions(lm_kwargs: dict[str, Any], length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[A, 1, L] positions of the full sequence (A = 1, or 3/4 rows of multimodal RoPE)."""
    pos = lm_kwargs.get("position_ids")
    if pos is None:
        return torch.arange(length, device=device).view(1, 1, -1)
    return pos[None] if pos.dim() == 2 else pos


def _rotary(lm: nn.Module, hidden: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's rotary (cos, sin) for [A, 1, L] positions."""
    return lm.rotary_emb(hidden, pos[0] if pos.shape[0] == 1 else pos[-3:])


def _layers(layers: Sequence[nn.Module], hidden: torch.Tensor, pe: tuple, cache: Any, lm: nn.Module | None = None,
            first: int = 0, deepstack: dict[str, Any] | None = None) -> torch.Tensor:
    """Stock decoder layers in turn, causal attention, writing the KV cache: no mask for SDPA and flash attention
    (one unpadded row: their causal flag), an explicit causal mask for eager attention (which has no such flag).
    ``deepstack``: the LM's DeepStack inputs for these rows, level j added after layer j as the LM does (``first``:
    the index of ``layers[0]``)."""
    mask = None
    if any(getattr(getattr(m, "self_attn", None), "config", None) is not None
           and m.self_attn.config._attn_implementation == "eager" for m in layers):
        n = hidden.shape[1]
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
        mask = mask.triu(1)[None, None]
    levels = (deepstack or {}).get("deepstack_visual_embeds") or []
    for i, layer in enumerate(layers, first):
        hidden = layer(hidden, attention_mask=mask, position_ids=None, past_key_values=cache, use_cache=True,
                       position_embeddings=pe)
        if i < len(levels):
            hidden = lm._deepstack_process(hidden, deepstack["visual_pos_masks"], levels[i])
    return hidden


def oracle(model: nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor, site: str, layer: int,
           last_only: bool, stages: Sequence[tuple[int, torch.Tensor]] = ()) -> torch.Tensor:
    """Logits of the unhooked model on the hand-shortened input: the kept rows ``keep`` at their original
    positions, from the LM input on (pre-LLM) or from decoder layer ``layer`` on (in-LLM). ``stages``: a
    multi-stage schedule instead, (cut layer, rows kept from there on) per cut (plain decoders only)."""
    if stages:
        return _staged_oracle(model, inputs, stages, last_only)
    from transformers import DynamicCache

    kw = lm_inputs(model, inputs)
    embeds = kw["inputs_embeds"]
    pos = full_positions(kw, embeds.shape[1], embeds.device)
    lm = language_model(model)
    if isinstance(kw.get("attention_mask"), dict):  # per-layer-type masks (Gemma 3)
        hidden = _typed_oracle(model, inputs, kw, pos, keep, site, layer)
        return model.lm_head(hidden[:, -1:] if last_only else hidden)
    if site == "pre_llm":
        short = pos[..., keep]
        hidden = lm(inputs_embeds=embeds[:, keep], position_ids=short[0] if short.shape[0] == 1 else short,
                    attention_mask=torch.ones(1, keep.numel(), dtype=torch.long, device=embeds.device),
                    use_cache=True, **shortened_lm_inputs(kw, keep)).last_hidden_state
    else:
        cache = DynamicCache(config=lm.config)
        every = torch.arange(embeds.shape[1], device=embeds.device)
        hidden = _layers(lm.layers[:layer], embeds, _rotary(lm, embeds, pos), cache, lm, 0,
                         shortened_lm_inputs(kw, every))[:, keep]
        hidden = lm.norm(_layers(lm.layers[layer:], hidden, _rotary(lm, hidden, pos[..., keep]), cache, lm, layer,
                                 shortened_lm_inputs(kw, keep)))
    return model.lm_head(hidden[:, -1:] if last_only else hidden)


def _staged_oracle(model: nn.Module, inputs: dict[str, torch.Tensor], stages: Sequence[tuple[int, torch.Tensor]],
                   last_only: bool) -> torch.Tensor:
    """:func:`oracle` of a multi-stage schedule: layers before the first cut on the whole prompt, then each layer
    group on the rows its cut kept (original positions), causal SDPA, one cache."""
    from transformers import DynamicCache

    kw = lm_inputs(model, inputs)
    if isinstance(kw.get("attention_mask"), dict) or kw.get("deepstack_visual_embeds") is not None:
        raise BenchSetupError("the multi-stage oracle covers plain decoders (no per-layer-type masks, no DeepStack)")
    lm = language_model(model)
    hidden = kw["inputs_embeds"]
    pos = full_positions(kw, hidden.shape[1], hidden.device)
    cache, rows, first = DynamicCache(config=lm.config), torch.arange(hidden.shape[1], device=hidden.device), 0
    for cut, kept in [*stages, (len(lm.layers), None)]:
        hidden = _layers(lm.layers[first:cut], hidden, _rotary(lm, hidden, pos[..., rows]), cache, lm, first)
        if kept is not None:  # the rows of this group that the cut keeps
            hidden, rows, first = hidden[:, torch.searchsorted(rows, kept)], kept, cut
    hidden = lm.norm(hidden)
    return model.lm_head(hidden[:, -1:] if last_only else hidden)


def _typed_oracle(model: nn.Module, inputs: dict[str, torch.Tensor], kw: dict[str, Any], pos: torch.Tensor,
                  keep: torch.Tensor, site: str, layer: int) -> torch.Tensor:
    """:func:`oracle`'s final hidden states for an LM given per-layer-type masks (Gemma 3: sliding windows and
    bidirectional image blocks from ``token_type_ids``): the masks and each layer type's rotary table as the model
    builds them, for the whole prompt (layers < K) and for the kept rows alone (pre-LLM; layers >= K)."""
    from transformers import DynamicCache

    lm = language_model(model)
    embeds, types = kw["inputs_embeds"], inputs.get("token_type_ids")
    kept_types = None if types is None else types[:, keep]
    ones = torch.ones(1, keep.numel(), dtype=torch.long, device=embeds.device)
    short = pos[0][..., keep]
    if site == "pre_llm":
        return model.model(inputs_embeds=embeds[:, keep], position_ids=short, attention_mask=ones,
                           token_type_ids=kept_types, use_cache=True).last_hidden_state
    cache, kinds = DynamicCache(config=lm.config), lm.config.layer_types

    def run(hidden: torch.Tensor, p: torch.Tensor, masks: dict[str, Any], first: int, last: int) -> torch.Tensor:
        pe = {t: lm.rotary_emb(hidden, p, t) for t in set(kinds)}
        for i in range(first, last):
            hidden = lm.layers[i](hidden, attention_mask=masks[kinds[i]], position_ids=None, past_key_values=cache,
                                  use_cache=True, position_embeddings=pe[kinds[i]])
        return hidden

    hidden = run(embeds, pos[0], kw["attention_mask"], 0, layer)[:, keep]
    masks = model.create_masks_for_generate(lm.config, hidden, ones, None, None, token_type_ids=kept_types)
    return lm.norm(run(hidden, short, masks, layer, len(lm.layers)))


# ---- the pruned side -----------------------------------------------------------------------------------
@dataclass
class Cell:
    """One family × site × keep: the equivalence check's outcome and the timings."""

    family: str
    site: str
    keep: float
    layer: int
    pruner: str = PRUNER
    tokens: int = 0  # full prompt length
    kept: int = 0  # rows the LLM (from layer K on) processes
    visual: tuple[int, int] = (0, 0)
    max_abs_diff: float = 0.0
    keep_index: torch.Tensor | None = None
    schedule: tuple[tuple[int, float], ...] = ()  # a multi-stage cell: (cut layer, keep) per cut
    stages: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # per cut: (layer, rows kept from there)
    pruned_s: list[float] = field(default_factory=list)
    oracle_s: list[float] = field(default_factory=list)
    hooks_s: dict[str, list[float]] = field(default_factory=dict)  # per hook name, per profiled prefill
    decode: DecodeStart | None = None  # --decode: the state both sides decode from
    decode_pruned_s: list[float] = field(default_factory=list)  # time of the N decode steps, per repeat
    decode_oracle_s: list[float] = field(default_factory=list)
    decode_hooks_s: list[float] = field(default_factory=list)  # --hooks: time in vtprune's hooks per decode step
    decode_error: str | None = None  # why the decode oracle could not run (reported in the table, not raised)

    @property
    def options(self) -> dict[str, Any]:
        """The ``vtprune.apply`` options of this cell."""
        if self.schedule:
            return {"site": "layer", "schedule": self.schedule}
        return {"keep": self.keep, "site": self.site} | ({"layer": self.layer} if self.site == "layer" else {})

    @property
    def label(self) -> str:
        if self.schedule:
            return "K=" + "/".join(str(layer) for layer, _ in self.schedule)
        return "pre_llm" if self.site == "pre_llm" else f"K={self.layer}"

    @property
    def ratio(self) -> float:
        """Median oracle time ÷ median pruned time."""
        return median(self.oracle_s) / median(self.pruned_s)

    @property
    def paired_ratio(self) -> float:
        """Median of the per-repeat ratios (each pair ran back to back, so slow drift cancels)."""
        return median([o / p for o, p in zip(self.oracle_s, self.pruned_s)])

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly record."""
        return {"family": self.family, "pruner": self.pruner, "site": self.site,
                "layer": self.layer if self.site == "layer" else None, "schedule": self.schedule or None,
                "keep": self.keep, "tokens": self.tokens, "kept": self.kept, "visual_before": self.visual[0],
                "visual_after": self.visual[1], "max_abs_diff": self.max_abs_diff,
                "pruned_ms": 1e3 * median(self.pruned_s), "oracle_ms": 1e3 * median(self.oracle_s),
                "ratio": self.ratio, "paired_ratio": self.paired_ratio,
                "pruned_ms_all": [1e3 * s for s in self.pruned_s], "oracle_ms_all": [1e3 * s for s in self.oracle_s],
                "hooks_ms": {name: 1e3 * median(s) for name, s in self.hooks_s.items()}} | self._decode_dict()

    def _decode_dict(self) -> dict[str, Any]:
        if self.decode_error is not None:
            return {"decode_error": self.decode_error}
        if self.decode is None or not self.decode_pruned_s:
            return {}
        steps = self.decode.steps
        return {"decode_steps": steps, "decode_max_abs_diff": self.decode.max_abs_diff,
                "decode_pruned_tok_s": steps / median(self.decode_pruned_s),
                "decode_oracle_tok_s": steps / median(self.decode_oracle_s), "decode_ratio": self.decode_ratio,
                "decode_hooks_ms_per_step": 1e3 * median(self.decode_hooks_s) if self.decode_hooks_s else None}

    @property
    def decode_ratio(self) -> float:
        """Median oracle decode time ÷ median pruned decode time (= pruned tokens/s ÷ oracle tokens/s)."""
        return median(self.decode_oracle_s) / median(self.decode_pruned_s)

    @property
    def hooks_ms(self) -> float | None:
        """Median time per pruned prefill inside vtprune's hooks (``--hooks``), or None if not profiled."""
        runs = list(zip(*self.hooks_s.values()))
        return 1e3 * median([sum(r) for r in runs]) if runs else None


def pruned_logits(model: nn.Module, inputs: dict[str, torch.Tensor], last_only: bool) -> torch.Tensor:
    """The (hooked) model's prefill logits, as timed: with a KV cache."""
    return model(**inputs, use_cache=True, logits_to_keep=1 if last_only else 0).logits


@torch.inference_mode()
def kept_rows(model: nn.Module, inputs: dict[str, torch.Tensor], cell: Cell) -> torch.Tensor:
    """Run the pruned prefill once, recording each image's selection; store the kept sequence rows built from it
    (and the token counts) in ``cell``; return the pruned logits at every position."""
    chosen: list[tuple[int, torch.Tensor]] = []
    with vtprune.apply(model, cell.pruner, **cell.options) as handle:
        cls = type(handle.pruner)  # the class: a multi-stage schedule has one pruner object per cut
        select, own = cls.select, "select" in vars(cls)

        def spy(self: Any, view: Any, k: int) -> Any:
            out = select(self, view, k)
            chosen.append((view.num_tokens, out.indices))
            return out

        cls.select = spy
        try:
            logits = pruned_logits(model, inputs, last_only=False)
        finally:
            if own:
                cls.select = select
            else:
                del cls.select  # inherited: leave the class as it was
    ids = inputs["input_ids"][0]
    visual = _item_tokens(model, ids)
    image, text = visual.nonzero().flatten(), ~visual  # every item's tokens in sequence order (items do not interleave)
    if cell.schedule:  # one image, one selection per cut among the tokens the earlier cuts kept (sequence order)
        cell.stages, remaining = [], image
        for (layer, _), (n, idx) in zip(cell.schedule, chosen, strict=True):
            remaining = remaining[idx.sort().values]
            kept = text.clone()
            kept[remaining] = True
            cell.stages.append((layer, kept.nonzero().flatten()))
        cell.keep_index = cell.stages[-1][1]
        chosen = chosen[-1:]
    else:
        kept, start = text.clone(), 0
        for n, idx in chosen:
            kept[image[start:start + n][idx]] = True
            start += n
        cell.keep_index = kept.nonzero().flatten()
    cell.tokens, cell.kept = ids.numel(), cell.keep_index.numel()
    cell.visual = (image.numel(), sum(idx.numel() for _, idx in chosen))
    return logits


def _item_tokens(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Where ``ids`` holds an image's or a video's placeholder (not the markers around them)."""
    cfg = model.config
    tokens = [getattr(cfg, name, None) for name in ("image_token_id", "video_token_id")]
    return torch.isin(ids, torch.tensor([t for t in tokens if t is not None], device=ids.device))


@torch.inference_mode()
def check(model: nn.Module, inputs: dict[str, torch.Tensor], cell: Cell) -> None:
    """:func:`kept_rows`, then the pruned logits must equal the oracle's on those rows (else
    :class:`OracleMismatch`)."""
    logits = kept_rows(model, inputs, cell)
    expected = oracle(model, inputs, cell.keep_index, cell.site, cell.layer, False, cell.stages)
    try:
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
    except AssertionError as e:
        raise OracleMismatch(f"{cell.family} {cell.label} keep={cell.keep}: pruned logits != oracle: {e}") from e
    cell.max_abs_diff = float((logits - expected).abs().max())


def _sync() -> None:
    """Wait for queued CUDA work (nothing to wait for on CPU, whose kernels are synchronous)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _seconds(fn: Callable[..., Any], *args: Any) -> float:
    """Wall time of one call, queued GPU work included."""
    _sync()
    start = time.perf_counter()
    fn(*args)
    _sync()
    return time.perf_counter() - start


def time_cells(model: nn.Module, inputs: dict[str, torch.Tensor], cells: list[Cell], repeats: int,
               warmup: int) -> None:
    """``warmup + repeats`` passes over all cells; in each, the pruned and oracle prefills back to back, the
    order alternating between passes. Hooks are installed and removed outside the timed calls."""
    for i in range(warmup + repeats):
        for cell in cells:
            sides = ("pruned", "oracle") if i % 2 == 0 else ("oracle", "pruned")
            for side in sides:
                if side == "pruned":
                    with vtprune.apply(model, cell.pruner, **cell.options):
                        t = _seconds(pruned_logits, model, inputs, True)
                else:
                    t = _seconds(oracle, model, inputs, cell.keep_index, cell.site, cell.layer, True, cell.stages)
                if i >= warmup:
                    (cell.pruned_s if side == "pruned" else cell.oracle_s).append(t)


# ---- decoding on the pruned cache ----------------------------------------------------------------------
@dataclass
class DecodeStart:
    """The cache right after the pruned prefill (its ledger attached), the first generated token, and the
    position [A, b] of the next token in original coordinates (from the ledger)."""

    cache: Any
    token: torch.Tensor
    next_pos: torch.Tensor
    steps: int
    max_abs_diff: float = 0.0


def greedy_token(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """[b, 1] greedy next token of the last position, never an image / video placeholder (a random model may rank
    one first; fed back, it would read as a new image or video without pixels)."""
    banned = torch.tensor(placeholder_ids(model.config), dtype=torch.long, device=logits.device)
    return logits[:, -1:].index_fill(-1, banned, float("-inf")).argmax(-1)


def decode_steps(model: nn.Module, cache: Any, token: torch.Tensor, steps: int,
                 next_pos: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``steps`` greedy decode forwards from ``cache``; the positions are the engine's (``next_pos`` None, hooked
    model) or given by hand from ``next_pos`` (the unhooked oracle)."""
    out = []
    for step in range(steps):
        kw = {}
        if next_pos is not None:
            pos = (next_pos + step)[..., None]
            kw["position_ids"] = pos[0] if pos.shape[0] == 1 else pos
        logits = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw).logits
        token = greedy_token(model, logits)
        out.append(logits)
    return out


@torch.inference_mode()
def check_decode(model: nn.Module, inputs: dict[str, torch.Tensor], cell: Cell, steps: int) -> None:
    """Prefill pruned, keep a copy of the cache, decode ``steps`` tokens hooked; the unhooked model decoding from
    the copy with positions by hand must give the same logits at every step (else :class:`OracleMismatch`)."""
    from vtprune.sites.continuation import ledger_of

    with vtprune.apply(model, cell.pruner, **cell.options):
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        start = DecodeStart(copy.deepcopy(out.past_key_values), greedy_token(model, out.logits),
                            ledger_of(out.past_key_values).next_pos, steps)
        pruned = decode_steps(model, out.past_key_values, start.token, steps)
    expected = decode_steps(model, copy.deepcopy(start.cache), start.token, steps, start.next_pos)
    for i, (got, want) in enumerate(zip(pruned, expected)):
        try:
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        except AssertionError as e:
            raise OracleMismatch(f"{cell.family} {cell.label} keep={cell.keep}: decode step {i} != oracle: {e}") from e
        start.max_abs_diff = max(start.max_abs_diff, float((got - want).abs().max()))
    cell.decode = start


def time_decode(model: nn.Module, cells: list[Cell], repeats: int, warmup: int) -> None:
    """Like :func:`time_cells` for the decode steps: each side decodes from its own copy of the post-prefill
    cache (copied untimed; the hooked side's copy carries the ledger, as deep copies do)."""
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for cell in cells:
                start = cell.decode
                sides = ("pruned", "oracle") if i % 2 == 0 else ("oracle", "pruned")
                for side in sides:
                    cache = copy.deepcopy(start.cache)
                    if side == "pruned":
                        with vtprune.apply(model, cell.pruner, **cell.options):
                            t = _seconds(decode_steps, model, cache, start.token, start.steps)
                    else:
                        t = _seconds(decode_steps, model, cache, start.token, start.steps, start.next_pos)
                    if i >= warmup:
                        (cell.decode_pruned_s if side == "pruned" else cell.decode_oracle_s).append(t)


# ---- where the pruned side's time goes ----------------------------------------------------------------
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


def _hook_keys(model: nn.Module) -> set[tuple[int, str, int]]:
    """(module id, hook dict, hook id) of every forward (pre-)hook on ``model``'s modules."""
    return {(id(m), kind, h) for m in model.modules() for kind in _HOOK_DICTS for h in getattr(m, kind)}


def _timed(fn: Callable[..., Any], name: str, spent: dict[str, float]) -> Callable[..., Any]:
    """``fn`` adding its wall time to ``spent[name]``, inside a ``record_function`` range of that name."""
    def hook(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        with torch.profiler.record_function(name):
            out = fn(*args, **kwargs)
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
        return out
    return hook


@contextmanager
def timed_hooks(model: nn.Module, known: set[tuple[int, str, int]]) -> Iterator[dict[str, float]]:
    """Every forward (pre-)hook not in ``known`` wrapped by :func:`_timed` under "Module:qualname" (the hooks
    of one name on several modules add up); the originals are put back on exit."""
    spent: dict[str, float] = {}
    wrapped = []
    for m in model.modules():
        for kind in _HOOK_DICTS:
            hooks = getattr(m, kind)
            for hid, fn in list(hooks.items()):
                if (id(m), kind, hid) not in known:
                    name = f"{type(m).__name__}:{getattr(fn, '__qualname__', type(fn).__name__)}"
                    hooks[hid] = _timed(fn, name, spent)
                    wrapped.append((hooks, hid, fn))
    try:
        yield spent
    finally:
        for hooks, hid, fn in wrapped:
            if hid in hooks:
                hooks[hid] = fn


def profile_hooks(model: nn.Module, inputs: dict[str, torch.Tensor], cell: Cell, runs: int) -> None:
    """``runs`` pruned prefills (untimed as a whole) with the time spent inside each of vtprune's hooks
    recorded into ``cell.hooks_s``: the engine's own work (selection, gathers, position and mask rebuilding)."""
    known = _hook_keys(model)
    with vtprune.apply(model, cell.pruner, **cell.options), timed_hooks(model, known) as spent:
        for _ in range(runs):
            spent.clear()
            pruned_logits(model, inputs, True)
            for name, seconds in spent.items():
                cell.hooks_s.setdefault(name, []).append(seconds)
        for _ in range(runs if cell.decode is not None else 0):  # the same for decode steps, per step
            spent.clear()
            decode_steps(model, copy.deepcopy(cell.decode.cache), cell.decode.token, cell.decode.steps)
            cell.decode_hooks_s.append(sum(spent.values()) / cell.decode.steps)


def run(families: Sequence[str], sites: Sequence[str], keeps: Sequence[float], layer: int, repeats: int,
        warmup: int, tiny: bool, hook_runs: int = 0, progress: bool = False, decode: int = 0,
        schedule: tuple[tuple[int, float], ...] = SCHEDULE, video_frames: int = 0) -> tuple[list[Cell], dict[str, Any]]:
    """Check and time every family × site × keep, and the ``schedule`` cell where ``sites`` has "schedule" (then,
    with ``hook_runs``, time the hooks; with ``decode``, check and time that many decode steps); returns the cells
    and the environment."""
    cells: list[Cell] = []
    env: dict[str, Any] = {}
    with torch.inference_mode():
        for family in families:
            model, inputs = build(family, tiny, video_frames=video_frames)
            env = env or environment(model)
            mine = [Cell(family, site, keep, layer) for site in sites if site in SITES for keep in keeps]
            if "schedule" in sites:
                mine.append(Cell(family, "layer", schedule[-1][1], schedule[0][0], schedule=schedule))
            for cell in mine:
                check(model, inputs, cell)
            time_cells(model, inputs, mine, repeats, warmup)
            if decode:
                for cell in mine:
                    try:
                        check_decode(model, inputs, cell, decode)
                    except (OracleMismatch, RuntimeError) as e:  # reported per cell; the other cells still run
                        cell.decode_error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        print(f"  {family:10s} {cell.label:7s} keep={cell.keep:<4} decode: {cell.decode_error}",
                              flush=True)
                time_decode(model, [c for c in mine if c.decode is not None], repeats, warmup)
            for cell in mine if hook_runs else ():
                profile_hooks(model, inputs, cell, hook_runs)
            if progress:
                for cell in mine:
                    hooks = "" if cell.hooks_ms is None else f", {cell.hooks_ms:.1f} ms in hooks"
                    dec = f", decode ratio {cell.decode_ratio:.3f}" if cell.decode_pruned_s else ""
                    print(f"  {family:10s} {cell.label:7s} keep={cell.keep:<4} ratio {cell.ratio:.3f} "
                          f"(paired {cell.paired_ratio:.3f}){hooks}{dec}", flush=True)
            cells += mine
            del model
    return cells, env


def markdown(cells: Sequence[Cell]) -> str:
    """One row per family × site × keep (and a decode table when decode steps were timed)."""
    hooks = any(c.hooks_s for c in cells)
    lines = [("| family | site | keep | tokens (kept / full) | pruned ms | oracle ms | ratio | paired ratio "
              f"| max abs Δ logits |{' in hooks ms |' if hooks else ''}"), "|" + "---|" * (9 + hooks)]
    for c in cells:
        lines.append(f"| {c.family} | {c.label} | {c.keep} | {c.kept} / {c.tokens} | {1e3 * median(c.pruned_s):.1f} "
                     f"| {1e3 * median(c.oracle_s):.1f} | **{c.ratio:.3f}** | {c.paired_ratio:.3f} "
                     f"| {c.max_abs_diff:.1e} |" + (f" {c.hooks_ms:.2f} |" if hooks else ""))
    decoded = [c for c in cells if c.decode_pruned_s or c.decode_error]
    if decoded:
        lines += ["", ("| family | site | keep | cache slots (layers >= K) | steps | pruned tok/s | oracle tok/s "
                       f"| ratio | max abs Δ logits |{' in hooks ms/step |' if hooks else ''}"), "|" + "---|" * (9 + hooks)]
        for c in decoded:
            d = c._decode_dict()
            if c.decode_error:
                lines.append(f"| {c.family} | {c.label} | {c.keep} | {c.kept} | – | – | – | n/a | {c.decode_error} |"
                             + (" – |" if hooks else ""))
                continue
            lines.append(f"| {c.family} | {c.label} | {c.keep} | {c.kept} | {d['decode_steps']} "
                         f"| {d['decode_pruned_tok_s']:.1f} | {d['decode_oracle_tok_s']:.1f} | **{c.decode_ratio:.3f}** "
                         f"| {d['decode_max_abs_diff']:.1e} |" + (f" {d['decode_hooks_ms_per_step']:.3f} |" if hooks else ""))
    return "\n".join(lines)


def _provenance() -> dict[str, Any]:
    """Which vtprune ran (path, commit of its checkout, and whether its files differ from that commit: a copied
    working tree may carry older git metadata than its files) and the load average: the machine may be shared."""
    where = Path(vtprune.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return {"vtprune": str(where), "commit": git("rev-parse", "HEAD"),
            "files_differ_from_commit": None if status is None else bool(status), "loadavg": os.getloadavg()}


def _csv(text: str, kind: type, allowed: Sequence[Any] | None = None) -> list[Any]:
    """A comma-separated option as a list, each item converted and (optionally) checked."""
    items = [kind(x) for x in text.split(",") if x]
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad or not items:
        raise BenchSetupError(f"{text!r}: expected a comma-separated subset of {list(allowed or [])}")
    return items


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, check and time every cell, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--sites", default=",".join(SITES),
                        help=f"subset of {','.join(SITES)},schedule (schedule: one multi-stage cell per family)")
    parser.add_argument("--schedule", default=",".join(f"{k}:{v}" for k, v in SCHEDULE),
                        help="the multi-stage cell's cuts, layer:keep,...")
    parser.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    parser.add_argument("--layer", type=int, default=2, help="K of the in-LLM site")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hooks", type=int, default=0, metavar="N",
                        help="after timing, N pruned prefills per cell with the time inside vtprune's hooks recorded")
    parser.add_argument("--decode", type=int, default=0, metavar="N",
                        help="also check and time N greedy decode steps on the pruned cache against the oracle")
    parser.add_argument("--tiny", action="store_true", help="tiny test models: checks the plumbing in seconds")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--video-frames", type=int, default=0, metavar="N",
                        help="prompt with a video of N frames instead of the image (families that prune videos)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.hooks < 0 or args.decode < 0:
        raise BenchSetupError(f"need repeats >= 1, warmup >= 0, hooks >= 0, decode >= 0 (got {args.repeats}, "
                              f"{args.warmup}, {args.hooks}, {args.decode})")
    families = _csv(args.families, str, FAMILIES)
    sites, keeps = _csv(args.sites, str, (*SITES, "schedule")), _csv(args.keeps, float)
    try:
        schedule = tuple((int(a), float(b)) for a, b in (item.split(":") for item in args.schedule.split(",")))
    except ValueError as e:
        raise BenchSetupError(f"--schedule {args.schedule!r}: expected layer:keep,layer:keep,...") from e
    torch.set_num_threads(args.threads)
    before = _provenance()
    cells, env = run(families, sites, keeps, args.layer, args.repeats, args.warmup, args.tiny, args.hooks,
                     progress=True, decode=args.decode, schedule=schedule, video_frames=args.video_frames)
    print(f"{env['cpu']} ({env['cpu_count']} cores), {env['torch_threads']} thread(s), torch {env['torch']}, "
          f"transformers {env['transformers']}; vtprune from {before['vtprune']} at {before['commit']}; "
          f"load average {before['loadavg'][0]:.2f} before, {os.getloadavg()[0]:.2f} after; median of "
          f"{args.repeats} after {args.warmup} warm-up, interleaved")
    if args.markdown:
        print(markdown(cells))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"env": env, "provenance": before | {"loadavg_after": os.getloadavg()},
                  "args": vars(args) | {"out": str(args.out)}, "results": [c.as_dict() for c in cells]}
        args.out.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
