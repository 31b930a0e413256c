"""The sweep grid: one cell = (model, pruner setting, task), the unpruned baseline first; each with a stable hash.

The hash covers everything a cell's numbers depend on (model spec, task data digest, setting, generation, seed,
backend) and nothing they don't (output folder, progress bars, measurement switches), so a rerun finds its
finished cells again and a changed task or option runs anew.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..config import PrunerConfig
from ..registry import make_config
from .schema import ModelSpec, PrunerSpec, SweepConfig
from .tasks import Task

BASELINE = "unpruned"


@dataclass(frozen=True)
class Setting:
    """A pruner setting, or the unpruned baseline (``pruner is None``)."""

    pruner: str | None = None
    keep: float | int | None = None
    site: str | None = None
    layer: int | None = None
    positions: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    label: str | None = None

    @property
    def is_baseline(self) -> bool:
        return self.pruner is None

    @property
    def method(self) -> str:
        """The method name a leaderboard ranks: pruner + where it prunes + non-default options (keep excluded)."""
        if self.pruner is None:
            return BASELINE
        if self.label:
            return self.label
        parts = [self.pruner]
        if self.site == "layer" and self.layer is not None:  # None: the pruner picks its cuts per model (pyramiddrop)
            parts.append(f"K={self.layer}")
        if self.positions == "compact":
            parts.append("compact")
        parts += [f"{k}={v}" for k, v in self.options if k != "seed"]
        return " ".join(parts)

    def pruner_config(self, seed: int) -> PrunerConfig | None:
        """The validated vtprune config (pruner seed: ``options.seed`` or the sweep seed)."""
        if self.pruner is None:
            return None
        return make_config(self.pruner, keep=self.keep, site=self.site, layer=self.layer, positions=self.positions,
                           **{"seed": seed, **dict(self.options)})

    def identity(self) -> dict[str, Any]:
        return {"pruner": self.pruner, "keep": self.keep, "site": self.site, "layer": self.layer,
                "positions": self.positions, "options": dict(self.options), "method": self.method}


def settings_of(spec: PrunerSpec) -> list[Setting]:
    """Every grid point of one pruner entry, with the layer the pruner's config resolves (its default K when the
    entry gives none), so the setting names what runs."""
    options = tuple(sorted(spec.options.items()))
    return [Setting(pruner=spec.name, options=options, label=spec.label,
                    **{**point, "layer": make_config(spec.name, **point, **spec.options).layer})
            for point in spec.grid()]


@dataclass
class Cell:
    """One unit of work and of the results store."""

    model: ModelSpec
    task: Task
    setting: Setting
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return stable_hash(self.identity)

    @property
    def label(self) -> str:
        keep = "" if self.setting.is_baseline else f" keep={self.setting.keep}"
        return f"{self.model.name} | {self.task.name} | {self.setting.method}{keep}"


def stable_hash(data: Any) -> str:
    """16 hex digits of the SHA-256 of canonical JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def expand(config: SweepConfig, tasks: list[Task]) -> list[Cell]:
    """All cells in run order: per model, per task it runs on, the baseline then every setting of the task's own
    ``pruners`` if it has them, else of the sweep's (duplicates dropped)."""
    grids = [[Setting()] + [s for p in (config.pruners if t.pruners is None else t.pruners) for s in settings_of(p)]
             for t in config.tasks]
    cells: list[Cell] = []
    seen: set[str] = set()
    for model in config.models:
        for spec, task, settings in zip(config.tasks, tasks, grids, strict=True):
            if spec.models is not None and model.name not in spec.models:
                continue
            for setting in settings:
                cell = Cell(model, task, setting, {
                    "backend": config.backend, "model": model.model_dump(), "task": task.identity(),
                    "setting": setting.identity(), "generation": config.generation.model_dump(), "seed": config.seed})
                if cell.hash not in seen:
                    seen.add(cell.hash)
                    cells.append(cell)
    return cells


def baseline_of(cell: Cell, cells: list[Cell]) -> Cell:
    """The unpruned cell of the same model and task."""
    return next(c for c in cells if c.setting.is_baseline and c.model.name == cell.model.name
                and c.task.name == cell.task.name)
