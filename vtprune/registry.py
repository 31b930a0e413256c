"""Name -> pruner registry (timm style): ``@register_pruner`` on a Pruner class with its config class. A class
may also answer to the older names in its ``aliases`` (e.g. ``"pagerank"`` for ``"zero_tprune"``): they work
wherever a name is taken (``apply``, YAML, lmms-eval), while :func:`list_pruners` lists each method once."""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any

from .config import SITE_CLASSES, PrunerConfig
from .errors import VTPruneError

if TYPE_CHECKING:
    from .methods.base import Pruner

_REGISTRY: dict[str, type["Pruner"]] = {}
#: alias -> the registered name it stands for
_ALIASES: dict[str, str] = {}


def register_pruner(cls: type["Pruner"]) -> type["Pruner"]:
    """Class decorator: register ``cls`` under ``cls.config_class.name`` and the ``aliases`` it sets itself
    (a subclass registered under a new name does not inherit its parent's aliases)."""
    name = cls.config_class.name
    if not name:
        raise TypeError(f"{cls.__name__}.config_class must set a class-level `name`")
    aliases = cls.__dict__.get("aliases", ())
    for taken in (name, *aliases):
        owner = _REGISTRY.get(_ALIASES.get(taken, taken))
        if owner is not None and owner is not cls:
            raise TypeError(f"pruner name {taken!r} is already registered by {owner.__name__}")
    _REGISTRY[name] = cls
    _ALIASES.update(dict.fromkeys(aliases, name))
    return cls


def list_pruners() -> list[str]:
    """Names of all registered pruners, sorted; aliases are not listed (see :func:`pruner_aliases`)."""
    return sorted(_REGISTRY)


def pruner_aliases() -> dict[str, str]:
    """Alias -> registered name, for the pruners that still answer to an older name."""
    return {alias: name for alias, name in sorted(_ALIASES.items()) if name in _REGISTRY}


def pruner_class(name: str) -> type["Pruner"]:
    """The pruner class registered as ``name`` (or an alias of it); a clear error (with suggestions) otherwise."""
    if isinstance(name, str) and _ALIASES.get(name) in _REGISTRY:
        name = _ALIASES[name]
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), [*_REGISTRY, *_ALIASES], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise VTPruneError(f"unknown pruner {name!r}; registered pruners: {', '.join(list_pruners())}.{hint}")
    return _REGISTRY[name]


def make_config(name_or_config: str | PrunerConfig, **options: Any) -> PrunerConfig:
    """A new validated config from a name + options, or from a config object (copied), for a site its pruner
    supports."""
    if isinstance(name_or_config, PrunerConfig):
        if options:
            raise VTPruneError(f"options {sorted(options)} given together with a config object; "
                               "set them on the config instead")
        pruner_class(name_or_config.name)
        config = dataclasses.replace(name_or_config)  # validated anew; a frozen config gives a free copy
    else:
        config_cls = pruner_class(name_or_config).config_class
        valid = config_cls.field_names()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise VTPruneError(f"unknown option(s) {unknown} for pruner {name_or_config!r}; valid options: {valid}")
        config = config_cls(**options)
    sites = pruner_class(config.name).sites
    if config.site not in sites:
        names = " or ".join(f"{SITE_CLASSES[s].title} site ({s!r})" for s in sites)
        raise VTPruneError(f"pruner {config.name!r} supports only the {names}, not site={config.site!r}")
    return config


def build_pruner(config: PrunerConfig) -> "Pruner":
    """Instantiate the pruner for a validated config."""
    return pruner_class(config.name)(config)
