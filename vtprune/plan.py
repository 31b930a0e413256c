"""The keep plan of one prefill and the tensor surgery that applies it.

A plan lists, per batch row, the sequence indices that survive (non-visual tokens + the selected visual
tokens, in original order). Rows with fewer survivors are re-padded on the left; ``valid`` marks real slots.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class KeepPlan:
    """index: [b, Lk] full-sequence index per slot; valid: [b, Lk]; full_len: L before pruning;
    replace_slots/replace_values: the (row [r], slot [r]) pairs whose state is replaced (merged tokens) and their new
    states [r, D];
    bias: [b, Lk] float ``log size`` per slot (``merge="proportional"``: the key bias of merged tokens), or None;
    item_counts: the tokens kept of each item of the call whose selection built the plan, when known (host ints)."""

    index: torch.Tensor
    valid: torch.Tensor
    full_len: int
    replace_slots: tuple[torch.Tensor, torch.Tensor] | None = None
    replace_values: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    item_counts: list[int] | None = None

    @property
    def length(self) -> int:
        return self.index.shape[1]

    @functools.cached_property
    def has_padding_slots(self) -> bool:
        """Whether any slot is re-padding; computed once per plan (it syncs with the device, and the in-LLM site
        asks at every layer)."""
        return not bool(self.valid.all())

    @property
    def may_pad(self) -> bool:
        """False only when the plan is known to have no padding slots (built knowing it, or asked already): no host
        read, so callers skip masking valid slots only when that is free to know."""
        return self.__dict__.get("has_padding_slots", True)

    @functools.cached_property
    def _row_index(self) -> torch.Tensor:
        """[Lk] the kept indices of a one-row plan, for :meth:`gather`."""
        return self.index[0]

    @property
    def is_identity(self) -> bool:
        """True when the plan keeps every token in place with no merged states: applying it changes nothing."""
        return (self.length == self.full_len and self.replace_slots is None and self.bias is None
                and not self.has_padding_slots
                and bool((self.index == torch.arange(self.full_len, device=self.index.device)).all()))

    @classmethod
    def identity(cls, batch: int, length: int, device: torch.device) -> "KeepPlan":
        """The plan that keeps all ``length`` tokens of every row (an unpruned stretch of a cache)."""
        index = torch.arange(length, device=device).expand(batch, -1)
        plan = cls(index=index, valid=torch.ones(batch, length, dtype=torch.bool, device=device), full_len=length)
        plan.has_padding_slots = False
        return plan

    def extend(self, n: int) -> "KeepPlan":
        """This plan followed by ``n`` unpruned tokens (merged states are dropped: the result maps slots and key
        biases only)."""
        return self.concat(KeepPlan.identity(self.index.shape[0], n, self.index.device))

    def concat(self, other: "KeepPlan") -> "KeepPlan":
        """This plan followed by ``other``, whose indices count from this plan's end (a later pruned chunk);
        key biases follow their slots (0 where a part has none)."""
        bias = None
        if self.bias is not None or other.bias is not None:
            bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.valid.shape, device=p.valid.device)
                              for p in (self, other)], 1)
        return KeepPlan(index=torch.cat([self.index, other.index + self.full_len], 1),
                        valid=torch.cat([self.valid, other.valid], 1), full_len=self.full_len + other.full_len,
                        bias=bias)

    def then(self, inner: "KeepPlan") -> "KeepPlan":
        """This plan followed by ``inner``, a plan over this plan's slots (a later cut of a multi-stage schedule):
        each of ``inner``'s slots mapped back to this plan's sequence indices (slots and key biases, as
        :meth:`extend`). ``inner``'s bias, when it has one, already counts what this plan merged (its cut merged
        tokens of known sizes); otherwise each slot keeps this plan's bias."""
        bias = inner.bias if inner.bias is not None or self.bias is None else self.bias.gather(1, inner.index)
        plan = KeepPlan(index=self.index.gather(1, inner.index), valid=inner.valid & self.valid.gather(1, inner.index),
                        full_len=self.full_len, bias=bias, item_counts=inner.item_counts)
        known = inner.__dict__.get("has_padding_slots"), self.__dict__.get("has_padding_slots")
        if known[0] or known == (False, False):  # padding follows from the parts without a read: inner pads, or none
            plan.has_padding_slots = bool(known[0])
        return plan

    @classmethod
    def from_keep_mask(cls, keep: torch.Tensor, replacements: list[tuple[int, torch.Tensor, torch.Tensor]] = (),
                       sizes: list[tuple[int, torch.Tensor, torch.Tensor]] = (), per_row: list[int] | None = None,
                       merged: bool | None = None) -> "KeepPlan":
        """Build from a [b, L] bool mask of surviving tokens, optional merged states given as
        ``(row, sequence positions [k], states [k, D])`` and optional token counts ``(row, positions [k],
        sizes [k])`` (the plan's ``bias`` is their log; none when every size is 1). ``per_row``: each row's
        surviving tokens when the caller knows them, ``merged``: whether any of ``sizes`` exceeds 1 when the caller
        knows it (no host read for either; a wrong value gives a wrong plan)."""
        b, full_len = keep.shape
        if per_row is None:
            per_row = keep.sum(1).tolist()  # the one host read: the plan's length, and whether any row is re-padded
        lk = max(per_row)
        if min(per_row) == lk:  # every row keeps as many: no padding slots, the kept indices row by row
            index = torch.nonzero_static(keep, size=b * lk, fill_value=0)[:, 1].view(b, lk)
            plan = cls(index=index, valid=torch.ones(b, lk, dtype=torch.bool, device=keep.device), full_len=full_len)
        else:
            counts = keep.sum(1)
            # a stable sort puts kept tokens last, in original order: left re-padding for free
            order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, full_len - lk:]
            valid = torch.arange(lk, device=keep.device)[None, :] >= (lk - counts)[:, None]
            first = order.gather(1, (lk - counts).clamp(max=lk - 1)[:, None])
            index = torch.where(valid, order, first)  # padding slots copy the row's first kept token
            plan = cls(index=index, valid=valid, full_len=full_len)
        plan.has_padding_slots = min(per_row) < lk
        if merged is None:
            merged = any(bool((s > 1).any()) for _, _, s in sizes)
        if not merged and not replacements:  # the common case: nothing to place in slots
            return plan
        slot_of = plan.slot_of()
        if merged:
            plan.bias = torch.zeros(b, lk, device=keep.device)
            for row, pos, size in sizes:
                plan.bias[row, slot_of[row, pos]] = size.to(plan.bias).log()
        if replacements:
            rows = torch.cat([torch.full_like(pos, row) for row, pos, _ in replacements])
            slots = torch.cat([slot_of[row, pos] for row, pos, _ in replacements])
            plan.replace_slots, plan.replace_values = (rows, slots), torch.cat([v for _, _, v in replacements])
        return plan

    def slot_of(self) -> torch.Tensor:
        """[b, L] the slot each kept token sits in, -1 for a dropped one, found by a scatter (padding slots write to a
        spare column that is cut off): no host read."""
        b, lk = self.index.shape
        out = torch.full((b, self.full_len + 1), -1, dtype=torch.long, device=self.index.device)
        out.scatter_(1, self.index.masked_fill(~self.valid, self.full_len),
                     torch.arange(lk, device=self.index.device).expand(b, lk))
        return out[:, :-1]

    # ---- gathering --------------------------------------------------------------------------------
    def gather(self, x: torch.Tensor, seq_dim: int, batch_dim: int = 0, index: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Gather ``x`` along ``seq_dim`` with the plan's per-row index (batch along ``batch_dim``);
        a batch dimension of size 1 is broadcast first."""
        seq_dim, batch_dim = seq_dim % x.dim(), batch_dim % x.dim()
        if x.shape[batch_dim] == 1 and (index if index is not None else self.index).shape[0] == 1:
            # one row (batch 1): a single index_select, not reshape + expand + gather
            return x.index_select(seq_dim, self._row_index if index is None else index[0])
        index = self.index if index is None else index
        b, lk = index.shape
        if x.shape[batch_dim] != b:
            x = x.expand(*[b if d == batch_dim else -1 for d in range(x.dim())])
        shape = [1] * x.dim()
        shape[batch_dim], shape[seq_dim] = b, lk
        idx = (index if batch_dim < seq_dim else index.t()).reshape(shape)
        target = list(x.shape)
        target[seq_dim] = lk
        return x.gather(seq_dim, idx.expand(target))

    def apply_states(self, states: torch.Tensor) -> torch.Tensor:
        """[b, L, D] -> [b, Lk, D], with merged tokens' states substituted."""
        out = self.gather(states, seq_dim=1)
        if self.replace_slots is not None:
            out = out.clone()
            out[self.replace_slots] = self.replace_values.to(out.dtype)
        return out

    def gather_2d_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A [b, L(+extra)] padding mask -> kept columns (invalid slots zeroed), extra columns appended."""
        extra = mask.shape[1] > self.full_len
        head = self.gather(mask[:, :self.full_len] if extra else mask, seq_dim=1)
        if self.may_pad:
            head = head & self.valid if head.dtype == torch.bool else head * self.valid.to(head.dtype)
        return torch.cat([head, mask[:, self.full_len:]], dim=1) if extra else head

    def gather_4d_mask(self, mask: torch.Tensor, rows: "KeepPlan | None" = None, fixed_width: bool = False
                       ) -> torch.Tensor:
        """A [b, h, q, L(+extra)] boolean or additive mask -> this plan's key columns (invalid slots masked),
        and the query rows of ``rows`` (the plan of the tokens this call prunes, if any). ``fixed_width``
        (static caches, whose key length never changes) pads the freed columns back as masked. Padding-slot
        rows of a prefill attend to themselves only, so no row is fully masked (NaNs in the cache)."""
        head = _restrict(self.gather(mask[..., :self.full_len], seq_dim=3), self.valid[:, None, None, :])
        parts = [head, mask[..., self.full_len:]]
        if fixed_width:
            parts.append(_restrict(mask[..., :self.full_len - self.length], torch.zeros((), dtype=torch.bool)))
        out = torch.cat(parts, dim=3)
        if rows is not None:
            out = rows.gather(out, seq_dim=2)
            if rows.length == self.length:  # a prefill: row i's own key is column i
                out = _self_only_rows(out, rows.valid)
        return out

    def gather_labels(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """[b, L] token labels -> the kept slots' labels, ``ignore_index`` on padding slots."""
        return self.gather(labels, seq_dim=1).masked_fill(~self.valid, ignore_index)

    def causal_mask(self, q_len: int, extra: int, like: str, dtype: torch.dtype, width: int | None = None
                    ) -> torch.Tensor:
        """Build a [b, 1, q, Lk+extra] mask from scratch (when the model passed none): causal over the
        kept slots (prefill) or all-visible (decode), with invalid slots masked. ``width`` (static caches, whose
        keys span the whole cache): that many key columns, those past ``Lk+extra`` masked."""
        b, lk = self.valid.shape
        dev = self.valid.device
        kv = lk + extra
        col_ok = torch.cat([self.valid, torch.ones(b, extra, dtype=torch.bool, device=dev)], 1)
        qpos = torch.arange(kv - q_len, kv, device=dev)[:, None]
        allowed = (torch.arange(kv, device=dev)[None, :] <= qpos)[None, None] & col_ok[:, None, None, :]
        if extra == 0 and q_len == lk:
            allowed = _self_only_rows(allowed, self.valid)
        if width is not None and width > kv:
            allowed = torch.cat([allowed, allowed.new_zeros(*allowed.shape[:3], width - kv)], 3)
        return to_mask_kind(allowed, like, dtype)


def to_mask_kind(allowed: torch.Tensor, like: str, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> the mask kind an attention kernel expects ("bool" or "additive")."""
    if like == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _restrict(mask: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask & ok
    return mask.masked_fill(~ok, torch.finfo(mask.dtype).min)


def _self_only_rows(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows of invalid (padding) slots may attend only to their own slot."""
    if bool(valid.all()):
        return mask
    q, kv = mask.shape[-2], mask.shape[-1]
    eye = torch.zeros(q, kv, dtype=torch.bool, device=mask.device)
    eye[torch.arange(q), torch.arange(q)] = True
    bad_row = ~valid[:, None, :, None]
    if mask.dtype == torch.bool:
        return torch.where(bad_row, eye[None, None], mask)
    self_only = torch.zeros_like(mask).masked_fill(~eye[None, None], torch.finfo(mask.dtype).min)
    return torch.where(bad_row, self_only, mask)
