"""What every pruning site implements, and the description of a call with images that sites act on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import VTPruneError
from ..plan import KeepPlan
from .continuation import Ledger


@dataclass
class ImageCall:
    """A language-model call that brings images: a prefill, or a later turn on a cached conversation.

    embeds/real/pos: the call's input states [b, q, D], real tokens [b, q] and positions [A, b, q] (original
    coordinates); next_pos: [A, b] position after its last real token; base/base_real: the cache's slots
    before this call (``None`` for a prefill) and which of them are real; static: fixed-length cache."""

    spans: Any  # vtprune.models.ImageSpans (sites import no family code)
    embeds: torch.Tensor
    real: torch.Tensor
    pos: torch.Tensor
    next_pos: torch.Tensor
    static: bool
    base: KeepPlan | None = None
    base_real: torch.Tensor | None = None
    #: :meth:`kept_real` by plan (a copy made by ``replace`` starts empty)
    _kept: dict[int, tuple[KeepPlan, torch.Tensor]] = dataclasses.field(default_factory=dict, init=False, repr=False,
                                                                         compare=False)

    def cols(self, plan: KeepPlan) -> KeepPlan:
        """Cache slot -> conversation index once this call's tokens are pruned by ``plan``."""
        return plan if self.base is None else self.base.concat(plan)

    def cache_real(self, kept_real: torch.Tensor) -> torch.Tensor:
        """Real slots of the cache after this call, given its own kept real slots."""
        return kept_real if self.base_real is None else torch.cat([self.base_real, kept_real], 1)

    def kept_real(self, plan: KeepPlan) -> torch.Tensor:
        """[b, plan.length] which of this call's slots hold real tokens once ``plan`` is applied (once per plan)."""
        hit = self._kept.get(id(plan))
        if hit is None or hit[0] is not plan:
            kept = plan.gather(self.real, 1)
            hit = self._kept[id(plan)] = (plan, kept & plan.valid if plan.may_pad else kept)
        return hit[1]

    def rebuilt_masks(self, engine: Any, plan: KeepPlan, embeds: torch.Tensor, cache: Any, from_layer: int
                      ) -> dict[str, Any] | None:
        """The family's per-layer-type masks for layers >= ``from_layer`` once ``plan`` is applied (the kept
        tokens' ``embeds``), as its model would build them on the kept tokens alone
        (``Engine.family_masks``); ``None`` where the sites gather the model's masks."""
        blocks = self.spans.blocks
        if blocks is not None:  # by cache slot: the slots cached before this call are in no block of its own
            blocks = plan.gather(blocks[:, -self.embeds.shape[1]:], 1).masked_fill(~plan.valid, -1)
            if self.base is not None:
                blocks = torch.cat([blocks.new_full((blocks.shape[0], self.base.length), -1), blocks], 1)
        padding = self.cache_real(self.kept_real(plan)).long()
        return engine.family_masks(embeds, padding, cache, from_layer, blocks)

    def ledger(self, plan: KeepPlan, pos_delta: torch.Tensor | None = None) -> Ledger:
        """The ledger of a cache that this call (pruned by ``plan``) has just written."""
        cols = self.cols(plan)
        return Ledger(plan=cols, next_pos=self.next_pos, real=self.cache_real(self.kept_real(plan)),
                      pos_delta=pos_delta)


class Site:
    """A place in the forward where visual tokens are dropped. Subclasses set :attr:`name` and
    :attr:`shortens_cache` and implement the three events the engine reports."""

    name: str = ""
    #: how messages name the site
    title: str = ""
    #: the ``positions`` policies the site supports (see :class:`vtprune.config.PrunerConfig`)
    position_policies: tuple[str, ...] = ("original", "compact")
    #: whether the cache length transformers reports is the pruned one (pre-LLM) or the full one (in-LLM,
    #: where layer 0 keeps every token)
    shortens_cache: bool = True
    #: whether ``merge="proportional"`` works here: its masks carry the per-key ``log size`` bias (vtprune/merge.py)
    supports_merge: bool = False

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # the vtprune.engine.Engine that calls this site (untyped: the engine imports sites)

    @classmethod
    def validate_options(cls, config: Any) -> None:
        """Check (and complete) the site options of a ``PrunerConfig`` as it is built; raise VTPruneError."""
        if config.layer is not None:
            raise VTPruneError(f"layer={config.layer!r} is only meaningful with site='layer' (site is "
                               f"{config.site!r})")
        if config.schedule is not None:
            raise VTPruneError(f"schedule={config.schedule!r}: a multi-stage schedule cuts inside the LLM, so it needs "
                               f"site='layer' (site is {config.site!r})")

    @classmethod
    def check(cls, config: Any, adapter: Any) -> None:
        """Refuse a configuration this site cannot run on this model (at ``apply`` time)."""

    def install(self) -> None:
        """Register any hooks of the site's own (through ``engine.hook_pre``)."""

    def reset(self) -> None:
        """Forget the state of the call in flight (a new language-model call begins, or the handle resets)."""

    def images(self, kwargs: dict[str, Any], call: ImageCall) -> None:
        """A language-model call with images: prune them (or arrange for it) and rewrite ``kwargs``."""
        raise NotImplementedError

    def continuation(self, kwargs: dict[str, Any], ledger: Ledger, past: int, q: int, static: bool) -> None:
        """A call of ``q`` tokens without images on a cache that a pruned call wrote."""
        raise NotImplementedError


def restrict_extras(extras: dict[str, Any], kept: torch.Tensor, n: int) -> dict[str, Any]:
    """One image's extras for its tokens ``kept`` (indices into its ``n`` original tokens): vision q/k patch maps
    and projector inputs restricted, decoder q/k left out (a later in-LLM cut recomputes them; a per-frame selection
    points them at the frame)."""
    out = {k: v for k, v in extras.items() if k not in ("llm_qk", "layer_qk")}
    if "vision_qk" in extras:
        new_index = torch.full((n,), -1, dtype=torch.long, device=kept.device)
        new_index[kept] = torch.arange(kept.numel(), device=kept.device)

        def remap(view: Any) -> Any:
            tokens = view.token_of_patch
            moved = new_index.to(tokens.device)[tokens.clamp(min=0)]
            return dataclasses.replace(view, token_of_patch=torch.where(tokens >= 0, moved, -1))
        out["vision_qk"] = {layer: [remap(v) for v in views] for layer, views in extras["vision_qk"].items()}
    proj = extras.get("projector")
    if proj is not None:
        idx = kept.to(proj.inputs.device)
        out["projector"] = dataclasses.replace(proj, inputs=proj.inputs[idx], valid=proj.valid[idx],
                                               exact=None if proj.exact is None else proj.exact[idx])
    return out
