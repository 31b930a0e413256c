"""The pre-LLM site: drop projected visual tokens, with their mask columns and positions, before the first
decoder layer. The cache then holds only kept tokens; its ledger maps it back to the conversation."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import VTPruneError
from ..merge import biased_mask, check_merge_support
from ..plan import KeepPlan
from .base import ImageCall, Site
from .continuation import Ledger, attach, cache_mask


def _is_packed(given: torch.Tensor | None) -> bool:
    """Padding-free packed rows: the text position ids transformers reads packing from ([b, L], or row 0 of
    Qwen's [4, b, L]) restart inside a row."""
    if given is None or (given.dim() == 3 and given.shape[0] != 4):
        return False
    text = given if given.dim() == 2 else given[0]
    return bool((text[..., 1:] < text[..., :-1]).any())


class PreLLMSite(Site):
    """Prunes the language model's input embeddings (prefill and later turns with images)."""

    name = "pre_llm"
    title = "pre-LLM"
    shortens_cache = True
    supports_merge = True

    @classmethod
    def check(cls, config: Any, adapter: Any) -> None:
        if config.merge != "none":
            check_merge_support(adapter)

    def images(self, kwargs: dict[str, Any], call: ImageCall) -> None:
        engine = self.engine
        plan = engine.select(call.embeds, call.spans, call.real)
        if plan.is_identity:
            return
        mask, given = kwargs.get("attention_mask"), kwargs.get("position_ids")
        own = engine.backbone_mask if isinstance(mask, dict) else mask  # per-layer masks: the backbone's own
        if call.base is None and own is None and _is_packed(given):
            raise VTPruneError("padding-free (packed) inputs cannot be pruned: transformers finds the sequence "
                               "boundaries from consecutive position ids, which pruning breaks; pass a padded "
                               "batch with an attention mask instead")
        kept_real = call.kept_real(plan)
        engine.recorder.real = kept_real.sum(1)
        kwargs["inputs_embeds"] = plan.apply_states(call.embeds)
        engine.adapter.gather_lm_inputs(kwargs, plan)
        rebuilt = None
        if isinstance(mask, dict):  # per-layer-type masks: the family may rebuild them for the kept tokens
            rebuilt = call.rebuilt_masks(engine, plan, kwargs["inputs_embeds"], kwargs.get("past_key_values"), 0)
            if rebuilt is None and call.base is not None:
                raise VTPruneError("a new image on a cached conversation with per-layer-type masks this family "
                                   "cannot rebuild")
        kwargs["attention_mask"] = rebuilt if rebuilt is not None else self._mask(mask, call, plan, kept_real)
        cols = call.cols(plan)
        if cols.bias is not None:
            self._bias(kwargs, cols.bias, plan.length, cols.length, call.static)
        kept_pos = plan.gather(call.pos, seq_dim=-1, batch_dim=-2)
        delta = None
        if engine.config.positions == "compact":  # prefill only: the engine refuses compact later images
            delta = call.next_pos - kept_real.sum(1)[None]
            compact = (kept_real.long().cumsum(1) - 1).clamp(min=0)
            kept_pos = compact[None].expand(call.pos.shape[0], -1, -1)
        kwargs["position_ids"] = self._model_positions(kept_pos, given)
        engine.prune_labels(plan)
        cache = engine.cache(kwargs)
        if cache is not None:
            attach(cache, call.ledger(plan, delta))

    @staticmethod
    def _mask(mask: Any, call: ImageCall, plan: KeepPlan, kept_real: torch.Tensor) -> Any:
        """The call's mask over the cache after pruning (keys by slot, queries by this call's kept tokens)."""
        cols = call.cols(plan)
        if isinstance(mask, dict) and all(m is None for m in mask.values()):
            mask = None  # ``generate``'s static-cache masks of a batch without padding: the model builds them
        if mask is None:
            # a 2-D mask even without padding: in a call with neither mask nor cache (uncached generation),
            # transformers would read the kept tokens' position gaps as packed sequences
            real = call.cache_real(kept_real)
            return None if bool(real.all()) and call.static else real.long()
        if isinstance(mask, dict):  # per layer type; a 2-D entry masks only this call's tokens (recurrent layers)
            return {k: None if m is None else plan.gather_2d_mask(m) if m.dim() == 2 else
                    cols.gather_4d_mask(m, plan, call.static) for k, m in mask.items()}
        if mask.dim() == 2:
            return cols.gather_2d_mask(mask)
        if mask.dim() == 4:
            return cols.gather_4d_mask(mask, plan, call.static)
        raise VTPruneError(f"unexpected attention mask of shape {tuple(mask.shape)}: expected [batch, seq] or "
                           "[batch, heads, query, key]")

    def _bias(self, kwargs: dict[str, Any], bias: torch.Tensor, q: int, kv: int, static: bool) -> None:
        """Carry merged tokens' ``log size`` key bias (``merge="proportional"``) in the call's attention mask."""
        kwargs["attention_mask"] = biased_mask(kwargs["attention_mask"], bias, q, kv,
                                               self.engine.adapter.attn_implementation, kwargs["inputs_embeds"].dtype,
                                               static)

    def _model_positions(self, pos: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
        """[A, b, L] back to the layout the model was given (2D for LLaVA; 3 or 4 rows for Qwen)."""
        if given is None or given.dim() == 3:
            return self.engine.adapter.to_model_positions(pos) if given is None else pos
        return pos[0]

    def continuation(self, kwargs: dict[str, Any], ledger: Ledger, past: int, q: int, static: bool) -> None:
        mask, rebuilt = kwargs.get("attention_mask"), None
        if isinstance(mask, dict):  # built by the backbone from its 2-D mask: the family may rebuild them
            padding = cache_mask(ledger, self.engine.backbone_mask, past, q, static)
            rebuilt = self.engine.family_masks(kwargs["inputs_embeds"], padding, kwargs.get("past_key_values"), 0)
        kwargs["attention_mask"] = rebuilt if rebuilt is not None else cache_mask(ledger, mask, past, q, static)
        if ledger.bias is not None:
            self._bias(kwargs, ledger.bias, q, past + q, static)
        pos = kwargs.get("position_ids")
        if ledger.pos_delta is not None and pos is not None:
            kwargs["position_ids"] = self._compact(pos, ledger.pos_delta)

    def _compact(self, pos: torch.Tensor, pos_delta: torch.Tensor) -> torch.Tensor:
        """Original-coordinate positions of a continuation -> the compact numbering of the cache."""
        axes = self.engine.adapter.as_axes(pos)
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
