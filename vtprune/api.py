"""The public entry point: ``vtprune.apply(model, pruner, **options)`` -> :class:`PruneHandle`."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from torch import nn

from . import timm_patch
from .models import adapter_for
from .config import PrunerConfig
from .engine import Engine
from .errors import VTPruneError
from .handle import Handle
from .registry import build_pruner, make_config
from .sites import site_class
from .stats import PruneStats

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, PruneHandle]" = weakref.WeakKeyDictionary()


class PruneHandle(Handle):
    """Pruning hooks installed on one model. Use as a context manager or call :meth:`remove`."""

    def __init__(self, model: nn.Module, engine: Engine) -> None:
        self.model = model
        self._engine: Engine | None = engine

    @property
    def config(self) -> PrunerConfig:
        return self._engine_or_raise().config

    @property
    def pruner(self):
        return self._engine_or_raise().pruner

    @property
    def active(self) -> bool:
        return self._engine is not None

    @property
    def stats(self) -> PruneStats:
        """What the last prefill (or later-turn call with images) did (visual tokens per sample, sequence length
        per decoder layer) and how many decode steps followed it."""
        return self._engine_or_raise().recorder.finalize()

    def set_hints(self, hints: Sequence[Any] | None) -> None:
        """Per-sample values (one per batch row, in batch order) for pruners that read them, such as
        ``informed``; they stay in force until replaced. Other pruners ignore them. New hints invalidate
        any selection kept for reuse."""
        if hints is not None and (isinstance(hints, (str, bytes)) or not isinstance(hints, (list, tuple))):
            raise VTPruneError(f"set_hints expects one hint per batch row (a list or tuple) or None, got "
                               f"{type(hints).__name__}")
        engine = self._engine_or_raise()
        engine.reset()
        engine.signals.hints = None if hints is None else list(hints)

    def reset(self) -> None:
        """Forget what earlier calls left in the hooks (selections kept for reuse inside a ``generate`` call).
        Each call already selects afresh; the state of a pruned KV cache travels with the cache object, so
        starting a new conversation only needs a new cache (or none)."""
        self._engine_or_raise().reset()

    def remove(self) -> None:
        """Remove every hook; the model behaves exactly as before :func:`apply`. Idempotent."""
        if self._engine is not None:
            self._engine.remove()
            self._engine = None
            if _ACTIVE.get(self.model) is self:
                del _ACTIVE[self.model]

    def _engine_or_raise(self) -> Engine:
        if self._engine is None:
            raise VTPruneError("this handle was removed")
        return self._engine

    def __repr__(self) -> str:
        return f"PruneHandle({self.config if self.active else 'removed'})"


def apply(model: nn.Module, pruner: str | PrunerConfig, **options: Any) -> "PruneHandle | timm_patch.TimmPruneHandle":
    """Install visual-token pruning on ``model`` (a supported ``*ForConditionalGeneration``).

    ``pruner`` is a registered name (see :func:`list_pruners`) with its options as keyword arguments, or a
    :class:`PrunerConfig` instance. Common options: ``keep`` (float fraction in (0, 1] or int tokens per
    image), ``site`` ("pre_llm" | "layer"), ``layer`` (K), ``positions`` ("original" | "compact"), ``seed``.
    """
    config = make_config(pruner, **options)
    config.freeze()
    if timm_patch.is_timm_vit(model):  # Zero-TPrune's own setting: prune between ViT blocks
        return timm_patch.apply_timm(model, config)
    adapter = adapter_for(model)
    instance = build_pruner(config)
    site_class(config.site).check(config, adapter)
    adapter.check_site(config, frozenset(instance.needs))
    if model in _ACTIVE:
        raise VTPruneError("this model already has vtprune hooks installed; call handle.remove() first")
    engine = Engine(model, adapter, instance, config)
    try:
        engine.install()
    except BaseException:
        engine.remove()  # never leave a half-installed set of hooks behind
        raise
    handle = PruneHandle(model, engine)
    _ACTIVE[model] = handle
    return handle
