"""Calls that continue a pruned KV cache: decode steps, later turns of a conversation, later images.

After a pruned prefill the cache holds fewer slots than the conversation has tokens. A :class:`Ledger`,
attached to the cache object itself (so a deep copy of the cache carries it and two conversations never
mix), maps the pruned layers' slots back to conversation positions. Every call that continues the cache
reads it to express masks and positions in cache coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import VTPruneError
from ..plan import KeepPlan

_ATTR = "_vtprune_ledger"


@dataclass
class Ledger:
    """plan: pruned layers' slot -> conversation index, up to the last call that pruned (``plan.full_len``
    tokens); next_pos: [A, b] next position after them (original coordinates); real: [b, plan.length]
    slots holding real tokens; ids: [b, n] every token id fed so far (pre-LLM site, to recognise re-fed
    tokens), ``None`` once a call came without ids; pos_delta: original minus compact next position."""

    plan: KeepPlan
    next_pos: torch.Tensor
    real: torch.Tensor
    pos_delta: torch.Tensor | None = None
    #: a multi-stage schedule's later layer groups (in-LLM site): (first decoder layer, slot -> conversation index,
    #: real slots) of each, whose layers cache fewer slots than ``plan``'s; ``plan``/``real`` are the first group's
    later: tuple[tuple[int, KeepPlan, torch.Tensor], ...] = ()

    def group(self, index: int) -> "Ledger":
        """The ledger of layer group ``index`` (0 = the first cut's layers, 1.. = :attr:`later`)."""
        if index == 0:
            return self
        _, plan, real = self.later[index - 1]
        return Ledger(plan=plan, next_pos=self.next_pos, real=real, pos_delta=self.pos_delta)

    @property
    def bias(self) -> torch.Tensor | None:
        """[b, plan.length] ``log size`` of every cached slot that stands for merged tokens (``merge="proportional"``,
        the plan's ``KeepPlan.bias``), added to each attention logit on that key at every later call; ``None``: no
        merging."""
        return self.plan.bias

    def appended(self, past: int, pruned_length: bool) -> int:
        """Tokens cached since ``plan`` was made, given the cache length ``past`` the model reports (the
        pruned length at the pre-LLM site, the full length when layer 0 keeps every token)."""
        return past - (self.plan.length if pruned_length else self.plan.full_len)

    def conversation_length(self, past: int, pruned_length: bool) -> int:
        """Tokens of the conversation the cache stands for (``past`` as in :meth:`appended`)."""
        return self.plan.full_len + self.appended(past, pruned_length)

    def physical_mask(self, appended_and_new: int) -> torch.Tensor:
        """[b, slots + n] long padding mask in cache coordinates, the last n tokens all real."""
        ones = torch.ones(self.real.shape[0], appended_and_new, dtype=torch.long, device=self.real.device)
        return torch.cat([self.real.long(), ones], 1)


def ledger_of(cache: Any) -> Ledger | None:
    """The ledger attached to a cache object, if a pruned call wrote one."""
    return getattr(cache, _ATTR, None)


def attach(cache: Any, ledger: Ledger) -> None:
    """Attach ``ledger`` to ``cache`` (an ordinary attribute: deep copies of the cache keep it)."""
    setattr(cache, _ATTR, ledger)


def is_static(cache: Any) -> bool:
    """Caches of fixed length (static, sliding-window static): their key length never changes."""
    return bool(getattr(cache, "is_compileable", False))


def refed_tokens(ledger: Ledger, past: int, inputs: dict[str, Any]) -> int:
    """How many cached tokens ``generate(**inputs, past_key_values=cache)`` will feed again.

    ``generate`` takes the new tokens of a continued conversation to be those past the cache's length when
    it is given the whole conversation (``inputs_embeds``, or ``input_ids`` as long as the attention mask);
    a pruned cache is shorter than the conversation, so the last ``conversation - past`` cached tokens come
    again. Given only the new tokens (with a mask over the whole conversation), it feeds nothing twice."""
    logical = ledger.conversation_length(past, pruned_length=True)
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    whole = inputs.get("inputs_embeds") is not None or (
        torch.is_tensor(ids) and (mask is None or mask.shape[-1] == ids.shape[-1]))
    return logical - past if whole else 0


def drop_leading(kwargs: dict[str, Any], n: int) -> None:
    """Remove the first ``n`` tokens of a call from every per-token input (the mask stays whole)."""
    for key in ("input_ids", "inputs_embeds", "mm_token_type_ids", "token_type_ids"):
        value = kwargs.get(key)
        if torch.is_tensor(value):
            kwargs[key] = value[:, n:]
    pos = kwargs.get("position_ids")
    if torch.is_tensor(pos):
        kwargs["position_ids"] = pos[..., n:]


def cache_mask(ledger: Ledger, mask: Any, past: int, q: int, static: bool) -> Any:
    """The attention mask of a pre-LLM continuation call (no new image), in cache coordinates.

    Accepted: none; a 2-D mask over the conversation or over the cache; a 4-D mask over the conversation;
    and the 4-D / per-layer-type masks ``generate`` builds for static caches (rebuilt from the ledger,
    since they mix cache-coordinate causality with conversation-coordinate padding)."""
    appended = ledger.appended(past, pruned_length=True)
    logical = ledger.conversation_length(past, pruned_length=True)
    if mask is None:
        return None if bool(ledger.real.all()) else ledger.physical_mask(appended + q)
    if static and (isinstance(mask, dict) or (torch.is_tensor(mask) and mask.dim() == 4)):
        return ledger.physical_mask(appended + q)
    if torch.is_tensor(mask) and mask.dim() in (2, 4):
        width = mask.shape[-1]
        if width == past + q:
            return mask
        if width == logical + q:
            return ledger.plan.gather_2d_mask(mask) if mask.dim() == 2 else ledger.plan.gather_4d_mask(mask)
        raise VTPruneError(f"attention mask of shape {tuple(mask.shape)} after a pruned prefill: its last dimension "
                           f"must span the conversation ({logical + q}) or the pruned cache ({past + q})")
    raise VTPruneError(f"unsupported attention mask {type(mask).__name__} for a call continuing a pruned cache")
