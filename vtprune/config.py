"""Pruner configuration: one dataclass per pruner, validated on construction (torchao style)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .errors import VTPruneError
from .sites import SITES as SITE_CLASSES

SITES = tuple(SITE_CLASSES)  # the built-in sites; registered ones are checked through SITE_CLASSES
POSITION_POLICIES = ("original", "compact")
#: what happens to dropped visual tokens: ``"none"`` drops them; ``"proportional"`` merges them (see vtprune/merge.py)
MERGE_MODES = ("none", "proportional")
#: the seeds torch.Generator.manual_seed accepts (negative seeds wrap modulo 2**64)
SEED_RANGE = (-2**63, 2**64 - 1)


def is_number(value: object) -> bool:
    """Whether ``value`` is an int or float option value (a bool is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(config: object, field: str, minimum: int, meaning: str = "") -> None:
    """Raise :class:`VTPruneError` naming ``field`` unless ``config.<field>`` is an int (not a bool) >= ``minimum``;
    ``meaning`` is added to the message in brackets."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise VTPruneError(f"{field}={value!r}: expected an int >= {minimum}" + (f" ({meaning})" if meaning else ""))


@dataclass
class PrunerConfig:
    """Options shared by every pruner.

    keep:      float in (0, 1] = fraction of each image's visual tokens kept; int >= 1 = tokens kept per
               image (capped by what the image has).
    site:      ``"pre_llm"`` drops projected visual tokens before the first decoder layer; ``"layer"`` drops
               them from the input of decoder layer ``layer`` during prefill (layers < K see everything).
    layer:     K for ``site="layer"`` (1 <= K < number of decoder layers).
    positions: ``"original"`` keeps the position ids computed on the full sequence (M-RoPE triples for
               Qwen); ``"compact"`` renumbers kept tokens 0..N'-1 (pre-LLM only).
    seed:      seeds every random choice a pruner makes; an int in ``SEED_RANGE`` (what
               ``torch.Generator.manual_seed`` accepts).
    schedule:  several in-LLM cuts in one prefill (``site="layer"``): ``((layer, keep), ...)`` with increasing layers
               and decreasing keeps, each keep counted on the image's full V (``keep`` and ``layer`` become the
               first cut's); see :class:`vtprune.sites.layer.LayerSite`.
    merge:     ``"none"`` (default) drops unselected visual tokens; ``"proportional"`` merges each into a kept
               token (size-weighted mean) and adds ``log size`` to every attention logit on that token
               (ToMe's proportional attention; :mod:`vtprune.merge`). Only at sites with ``supports_merge``.
    per_frame: ``False`` (default) counts ``keep`` on a whole video and lets the method choose anywhere in it;
               ``True`` shares the video's budget over its frames in proportion to their sizes
               (:func:`vtprune.view.frame_budgets`) and runs the method on each frame alone (docs/video.md).
               Images are unaffected.

    :func:`vtprune.apply` installs a frozen copy: the hooks and the pruner were built from it, so setting a
    field of ``handle.config`` raises; ``dataclasses.replace(handle.config, keep=...)`` gives a new config.
    """

    name: ClassVar[str] = ""
    #: the cuts of :meth:`default_schedule` read layer K-1's attention (FastV's convention), not layer K's: the in-LLM
    #: site then offers cut layers whose K-1 is an attention layer
    cut_reads_previous_layer: ClassVar[bool] = False
    keep: float | int = 1.0
    site: str = "pre_llm"
    layer: int | None = None
    positions: str = "original"
    seed: int = 0
    merge: str = "none"
    schedule: tuple[tuple[int, float | int], ...] | None = None
    per_frame: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`VTPruneError` naming the offending field."""
        keep = self.keep
        if not is_number(keep):
            raise VTPruneError(f"keep must be a float in (0, 1] or an int >= 1, got {keep!r}")
        if isinstance(keep, float) and not 0.0 < keep <= 1.0:
            raise VTPruneError(
                f"keep={keep!r}: a float keep is a fraction of visual tokens and must be in (0, 1]; "
                "pass an int for an absolute token count")
        if isinstance(keep, int) and keep < 1:
            raise VTPruneError(f"keep={keep!r}: an int keep is a token count and must be >= 1")
        if not isinstance(self.site, str) or self.site not in SITE_CLASSES:
            raise VTPruneError(f"site={self.site!r}: expected one of {tuple(SITE_CLASSES)}")
        if self.positions not in POSITION_POLICIES:
            raise VTPruneError(f"positions={self.positions!r}: expected one of {POSITION_POLICIES}")
        SITE_CLASSES[self.site].validate_options(self)
        if not isinstance(self.merge, str) or self.merge not in MERGE_MODES:
            raise VTPruneError(f"merge={self.merge!r}: expected one of {MERGE_MODES}")
        if self.merge != "none" and not SITE_CLASSES[self.site].supports_merge:
            raise VTPruneError(f"merge={self.merge!r} is not supported at site={self.site!r} yet (its cache and "
                               "masks carry no per-key attention bias); use site='pre_llm'")
        if not isinstance(self.per_frame, bool):
            raise VTPruneError(f"per_frame must be True or False, got {self.per_frame!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise VTPruneError(f"seed must be an int, got {self.seed!r}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise VTPruneError(f"seed={self.seed}: expected an int in [-2**63, 2**64 - 1], the range "
                               "torch.Generator.manual_seed accepts")

    def default_schedule(self, num_layers: int, allowed: list[int]) -> tuple[tuple[int, float | int], ...] | None:
        """The in-LLM cuts this pruner makes on a ``num_layers``-layer decoder when ``schedule`` is not given
        (e.g. PyramidDrop's), at layers among ``allowed`` (those the model's family can cut at for this pruner);
        ``None``: one cut at ``layer``."""
        return None

    @property
    def compact_stages(self) -> bool:
        """Whether the in-LLM site renumbers each layer group's tokens 0..N-1 from the first cut on and continues
        each group from its own cache length at decode (PyramidDrop's reference code); ``False`` (default): the
        original positions everywhere."""
        return False

    def freeze(self) -> None:
        """Refuse every later field assignment (the config of installed hooks must not drift from them)."""
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: object) -> None:
        if self.__dict__.get("_frozen"):
            raise VTPruneError(f"cannot set {name}={value!r}: this config belongs to applied pruning hooks and is "
                               f"frozen; remove the handle and apply dataclasses.replace(config, {name}=...)")
        super().__setattr__(name, value)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the options this config accepts."""
        return [f.name for f in dataclasses.fields(cls)]


#: the ``mode`` option of methods with a reference mode
MODES = ("clean", "reference")


@dataclass
class ModeOption:
    """Config mixin. mode: ``"clean"`` (exact budget, documented choices) or ``"reference"`` (the reference
    code's rules)."""

    mode: str = "clean"

    def validate_mode(self) -> None:
        """Raise :class:`VTPruneError` naming the field."""
        if self.mode not in MODES:
            raise VTPruneError(f"mode={self.mode!r}: expected one of {MODES}")

    @property
    def reference(self) -> bool:
        return self.mode == "reference"
