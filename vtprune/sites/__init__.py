"""Pruning sites, one file each: where in the forward visual tokens are dropped.

``pre_llm`` (:mod:`.pre_llm`) before the first decoder layer; ``layer`` (:mod:`.layer`) from decoder layer K
on. :mod:`.continuation` is the one place that maps a pruned cache back to the conversation for the calls
that continue it.
"""

from __future__ import annotations

from ..errors import VTPruneError
from .base import ImageCall, Site
from .layer import LayerSite
from .pre_llm import PreLLMSite

SITES: dict[str, type[Site]] = {}


def register_site(cls: type[Site]) -> type[Site]:
    """Class decorator: make ``cls`` available as ``site=cls.name`` (configs, ``apply``, YAML)."""
    if not cls.name or cls.name in SITES and SITES[cls.name] is not cls:
        raise TypeError(f"site name {cls.name!r} is empty or already registered")
    SITES[cls.name] = cls
    return cls


for _builtin in (PreLLMSite, LayerSite):
    register_site(_builtin)


def site_class(name: str) -> type[Site]:
    """The site registered under ``name``."""
    if name not in SITES:
        raise VTPruneError(f"site={name!r}: expected one of {tuple(SITES)}")
    return SITES[name]


__all__ = ["ImageCall", "LayerSite", "PreLLMSite", "SITES", "Site", "register_site", "site_class"]
