"""The sweep YAML: pydantic models, ``include:`` merging, and validation errors that name file, field and expectation.

Everything is checked before anything runs: unknown keys, types, model sources, that paths exist, and every
pruner setting of the grid through vtprune's registry (so a misspelt option fails here, not in cell 37).
Relative paths of models and tasks resolve against the directory of the YAML file that sets them; ``output``
(where results go) resolves against the current directory.
"""

from __future__ import annotations

import itertools
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import VTPruneError
from ..models import FAMILIES
from ..registry import make_config, pruner_class

METRICS = ("exact_match", "vqa", "multiple_choice")
_PATH_KEYS = {"models": ("path", "config", "processor"), "tasks": ("path",)}
GRID_FIELDS = ("keep", "site", "layer", "positions")
#: largest sweep seed: it seeds torch, numpy (the generated tasks) and every pruner without overflow
MAX_SEED = 2**32 - 1
#: YAML 1.2 core-schema floats: unlike YAML 1.1 (PyYAML's default) they include ``1e-3`` and ``1.0e3``
_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
                           |[-+]?[0-9]+[eE][-+]?[0-9]+
                           |[-+]?\.(?:inf|Inf|INF)
                           |\.(?:nan|NaN|NAN))$""", re.VERBOSE)


class _SafeLoader12(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only, never code) with YAML 1.2 float resolution, so ``keep: 1e-3`` is a
    number, not the string YAML 1.1 makes of it."""


_SafeLoader12.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SafeLoader12.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


class ConfigError(VTPruneError):
    """A sweep config is invalid; the message lists every problem as ``file: field: what was expected``."""


class _Strict(BaseModel):
    """Unknown keys are errors everywhere."""

    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """One model: exactly one source out of ``path`` (a saved model + processor), ``config`` +
    ``random_weights: true`` (+ ``processor``: a saved processor directory), or ``tiny`` (a tiny random
    ``vtprune.testing`` model, saved under the output directory on first use)."""

    name: str | None = None
    path: str | None = None
    config: str | None = None
    random_weights: bool = False
    processor: str | None = None
    tiny: Literal[FAMILIES] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn: str = "sdpa"
    batch_size: int = Field(1, ge=1)
    device: str = "auto"
    prompt: str = "chat"

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        sources = [k for k in ("path", "config", "tiny") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError(f"give exactly one of path / config / tiny (got {sources or 'none'})")
        if self.config is not None and not self.random_weights:
            raise ValueError("a config holds no weights: set random_weights: true, or give a saved model as path")
        if self.config is not None and self.processor is None:
            raise ValueError("a random-weight model built from a config needs processor: DIR (a saved processor "
                             "whose tokenizer and image processor match the config)")
        if self.prompt != "chat" and "{question}" not in self.prompt:
            raise ValueError("prompt is 'chat' (the processor's chat template) or a template containing {question}")
        if self.name is None:
            self.name = f"tiny-{self.tiny}" if self.tiny else Path(self.path or self.config).stem
        return self


def _as_list(value: Any) -> Any:
    """A scalar where a grid list is expected means a one-element list."""
    return value if isinstance(value, list) else [value]


class PrunerSpec(_Strict):
    """One pruner and its grid: every combination of ``keep`` × ``site`` × ``layer`` × ``positions`` is a setting;
    ``options`` are the pruner's own options (validated by its config class). A ``site`` of ``None`` (the default)
    is the pruner's own default site, e.g. ``layer`` for FastV and DART. A multi-stage schedule is the option
    ``schedule: [[layer, keep], ...]`` with ``keep`` the first cut's (docs/harness.md)."""

    name: str
    keep: list[StrictFloat | StrictInt] = Field(min_length=1)
    site: list[Literal["pre_llm", "layer"] | None] = [None]
    layer: list[StrictInt | None] = [None]
    positions: list[Literal["original", "compact"]] = ["original"]
    options: dict[str, Any] = {}
    label: str | None = None

    _lists = field_validator("keep", "site", "layer", "positions", mode="before")(_as_list)

    @field_validator("options")
    @classmethod
    def _no_grid_keys(cls, options: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(options) & set(GRID_FIELDS))
        if clash:
            raise ValueError(f"{clash} are grid fields of the pruner entry, not options")
        return options

    def grid(self) -> list[dict[str, Any]]:
        """Every distinct (keep, site, layer, positions) combination, an unset site being the pruner's default;
        ``layer`` only applies to site ``layer``. An int keep (tokens) and a float keep (a fraction) are different
        budgets even when equal as numbers (``1`` vs ``1.0``)."""
        default_site = pruner_class(self.name).config_class.site
        out: dict[tuple, dict[str, Any]] = {}
        for keep, site, layer, positions in itertools.product(self.keep, self.site, self.layer, self.positions):
            site = site or default_site
            point = {"keep": keep, "site": site, "layer": layer if site == "layer" else None, "positions": positions}
            out.setdefault(tuple((type(v), v) for v in point.values()), point)
        return list(out.values())


class TaskSpec(_Strict):
    """One local task: a folder (``path``), a generated one (``synthetic: shapes`` with ``size`` questions), or the
    first ``size`` held-out questions of the repository's testbed rendered for one testbed model (``testbed: llava``
    or ``testbed: qwen2_vl``; ``testbed: qwen2_vl_video``: the video testbed's questions, 8 frames each, for the
    Qwen2-VL video testbed; ``vtprune.testbed.export.TESTBEDS``). ``name`` defaults to the folder's ``task.yaml``
    name, else the folder name. ``models`` names the models it runs on (default: every model of the sweep), e.g. a
    testbed task rendered for one testbed model. ``pruners`` (entries as the sweep's) is the task's own grid, run
    instead of the sweep's ``pruners`` (e.g. temporal methods on a video task of a sweep of image tasks)."""

    path: str | None = None
    synthetic: Literal["shapes"] | None = None
    testbed: Literal["llava", "qwen2_vl", "qwen2_vl_video"] | None = None
    size: int = Field(24, ge=1)
    name: str | None = None
    metric: Literal["exact_match", "vqa", "multiple_choice"] | None = None
    limit: int | None = Field(None, ge=1)
    prompt_suffix: str | None = None
    models: list[str] | None = Field(None, min_length=1)
    pruners: list[PrunerSpec] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        sources = [k for k in ("path", "synthetic", "testbed") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of path (a task folder) / synthetic (a generated task) / testbed "
                             f"(the testbed's held-out set), got {sources or 'none'}")
        if self.name is None and self.synthetic:
            self.name = f"{self.synthetic}-{self.size}"
        if self.name is None and self.testbed:
            self.name = f"testbed-{self.testbed}-{self.size}"
        return self


class GenerationSpec(_Strict):
    """Greedy decoding settings."""

    max_new_tokens: int = Field(8, ge=1)


class MeasureSpec(_Strict):
    """Measurement settings: ``memory`` runs one extra untimed prefill per cell for its peak memory (it doubles as
    the warm-up); ``threads`` sets torch's CPU threads (default 1, as timings on shared CPUs need)."""

    memory: bool = True
    threads: int = Field(1, ge=1)


class LmmsEvalSpec(_Strict):
    """Options of the lmms-eval backend."""

    num_processes: int = Field(1, ge=1)
    timeout_s: int = Field(3600, ge=1)
    extra_args: list[str] = []


class SweepConfig(_Strict):
    """A whole sweep: the grid models × pruners × keeps × tasks, plus the unpruned baseline of every model/task."""

    name: str = "sweep"
    output: str | None = None
    backend: Literal["local", "lmms_eval"] = "local"
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    models: list[ModelSpec] = Field(min_length=1)
    pruners: list[PrunerSpec] = []
    tasks: list[TaskSpec] = Field(min_length=1)
    generation: GenerationSpec = GenerationSpec()
    measure: MeasureSpec = MeasureSpec()
    lmms_eval: LmmsEvalSpec = LmmsEvalSpec()

    @model_validator(mode="after")
    def _unique_names(self) -> SweepConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; set name: on the entries named {dup}")
        for i, task in enumerate(self.tasks):
            unknown = sorted(set(task.models or ()) - set(names))
            if unknown:
                raise ValueError(f"tasks[{i}].models: no model named {unknown} in this sweep (models: {names})")
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.output or Path("runs") / self.name).resolve()


# ---- loading ------------------------------------------------------------------------------------------
Provenance = dict[tuple[str, ...], Path]


def load_config(path: str | Path, output: str | Path | None = None) -> SweepConfig:
    """Read, merge (``include:``), validate and check a sweep YAML; :class:`ConfigError` lists every problem.
    ``output`` overrides the file's ``output``."""
    path = Path(path).resolve()
    data, prov = _load_raw(path, ())
    data.setdefault("name", path.stem)
    if output is not None:
        data["output"] = str(output)
    try:
        config = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_report(_pydantic_issues(e.errors(), prov, path))) from None
    problems = _check_pruners(config, prov, path) + _check_sources(config, prov, path)
    if problems:
        raise ConfigError(_report(problems))
    return config


def _report(problems: list[str]) -> str:
    return "invalid sweep config:\n  " + "\n  ".join(problems)


def _load_raw(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], Provenance]:
    """One file with its includes merged under it (the including file wins; dicts merge, lists are replaced)."""
    if path in chain:
        raise ConfigError(f"{path}: include cycle: {' -> '.join(str(p) for p in (*chain, path))}")
    try:
        data = yaml.load(path.read_text(), Loader=_SafeLoader12)
    except OSError as e:
        where = f" (included from {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: cannot read{where}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep config is a mapping of keys (name, models, pruners, tasks, ...), "
                          f"got {type(data).__name__}")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include: expected a file name or a list of file names, got {includes!r}")
    _resolve_paths(data, path.parent)
    merged: dict[str, Any] = {}
    prov: Provenance = {}
    for inc in includes:
        sub, sub_prov = _load_raw((path.parent / inc).resolve(), (*chain, path))
        _merge(merged, prov, sub, sub_prov, ())
    _merge(merged, prov, data, None, (), path)
    return merged, prov


def _merge(into: dict, prov: Provenance, new: dict, new_prov: Provenance | None, prefix: tuple[str, ...],
           file: Path | None = None) -> None:
    """Deep-merge ``new`` into ``into``, recording which file set each key path."""
    for key, value in new.items():
        key_path = (*prefix, str(key))
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], prov, value, new_prov, key_path, file)
            continue
        into[key] = value
        for old in [p for p in prov if p[:len(key_path)] == key_path]:
            del prov[old]
        if new_prov is None:
            prov[key_path] = file
        else:
            prov.update({p: f for p, f in new_prov.items() if p[:len(key_path)] == key_path})


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative model/task paths absolute against ``base`` (a shipped config name stays a name)."""
    for section, keys in _PATH_KEYS.items():
        entries = data.get(section)
        for entry in entries if isinstance(entries, list) else []:
            for key in keys if isinstance(entry, dict) else []:
                value = entry.get(key)
                if isinstance(value, str) and not Path(value).is_absolute():
                    candidate = base / value
                    if key != "config" or candidate.exists() or "/" in value or value.endswith(".json"):
                        entry[key] = str(candidate.resolve())


def _file_for(loc: tuple[Any, ...], prov: Provenance, default: Path) -> Path:
    keys = tuple(str(p) for p in loc if isinstance(p, str))
    for n in range(len(keys), 0, -1):
        if keys[:n] in prov:
            return prov[keys[:n]]
    return default


def _field_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(top level)"


def _model_fields(cls: Any) -> dict[str, Any] | None:
    """The fields of a pydantic model class, else ``None``."""
    return cls.model_fields if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """``list[X]`` / ``X | None`` -> ``X`` (the model class an item or an optional field holds)."""
    while typing.get_origin(annotation) is not None:
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), None)
    return annotation


def _real_loc(err: dict[str, Any]) -> tuple[tuple[Any, ...], Any]:
    """Drop pydantic's union-member tags from an error location; also return the model class at its end."""
    cls: Any = SweepConfig
    loc: list[Any] = []
    parts = err["loc"]
    for i, part in enumerate(parts):
        fields = _model_fields(cls)
        if isinstance(part, int):
            loc.append(part)
        elif fields is not None and part in fields:
            loc.append(part)
            cls = _unwrap(fields[part].annotation)
        elif err["type"] == "extra_forbidden" and i == len(parts) - 1:
            loc.append(part)
    return tuple(loc), cls


def _pydantic_issues(errors: list[dict[str, Any]], prov: Provenance, root: Path) -> list[str]:
    """One line per field: ``file: field: message (got value)``; union alternatives are merged into one line."""
    grouped: dict[tuple[Any, ...], tuple[list[str], str]] = {}
    for err in errors:
        loc, cls = _real_loc(err)
        got = ""
        if err["type"] == "extra_forbidden":
            text = f"unknown key; expected one of {', '.join(sorted(_model_fields(cls) or []))}"
        elif err["type"] == "missing":
            text = "required, missing"
        else:
            text = re.sub(r"^(Value error|Assertion failed), ", "", err["msg"])
            got = "" if err["type"] == "value_error" else f" (got {err['input']!r})"
        texts, _ = grouped.setdefault(loc, ([], got))
        if text not in texts:
            texts.append(text)
    return [f"{_file_for(loc, prov, root)}: {_field_name(loc)}: {', or '.join(texts)}{got}"
            for loc, (texts, got) in grouped.items()]


def _check_pruners(config: SweepConfig, prov: Provenance, root: Path) -> list[str]:
    """Build every setting's config through the registry: unknown pruners/options, bad budgets and seeds, and sites a
    pruner cannot act at fail now."""
    problems = []

    def report(where: tuple[Any, ...], field: str, text: str) -> None:
        loc = (*where, *field.split("."))
        problems.append(f"{_file_for(loc, prov, root)}: {_field_name(loc)}: {text}")

    entries = [(("pruners", i), spec) for i, spec in enumerate(config.pruners)]
    entries += [(("tasks", t, "pruners", i), spec) for t, task in enumerate(config.tasks)
                for i, spec in enumerate(task.pruners or [])]
    for where, spec in entries:
        try:
            points = spec.grid()
        except VTPruneError as e:  # an unknown pruner
            report(where, "name", str(e))
            continue
        for point in points:
            try:
                make_config(spec.name, **point, **{"seed": config.seed, **spec.options})
            except VTPruneError as e:
                report(where, _field_of(str(e), spec, point), str(e))
                break
    return problems


def _field_of(text: str, spec: PrunerSpec, point: dict[str, Any]) -> str:
    """The entry field a registry error about ``point`` concerns: ``site`` (one the pruner cannot act at), else the
    grid field or ``options.<option>`` its message starts with, else ``options``."""
    if point["site"] not in pruner_class(spec.name).sites:
        return "site"
    word = re.match(r"\w*", text).group()
    if word in GRID_FIELDS:
        return word
    return f"options.{word}" if word in spec.options else "options"


def _check_sources(config: SweepConfig, prov: Provenance, root: Path) -> list[str]:
    """Model and task paths exist; the lmms-eval backend needs saved models."""
    from ..benchmark import resolve_model

    problems = []
    for i, m in enumerate(config.models):
        for key in ("path", "processor"):
            value = getattr(m, key)
            if value is not None and not Path(value).is_dir():
                loc = ("models", i, key)
                problems.append(f"{_file_for(loc, prov, root)}: {_field_name(loc)}: no such directory {value}")
        if m.config is not None:
            try:
                resolve_model(m.config)
            except VTPruneError as e:
                loc = ("models", i, "config")
                problems.append(f"{_file_for(loc, prov, root)}: {_field_name(loc)}: {e}")
        if config.backend == "lmms_eval" and m.random_weights:
            loc = ("models", i, "random_weights")
            problems.append(f"{_file_for(loc, prov, root)}: {_field_name(loc)}: the lmms_eval backend loads saved "
                            "models; use path or tiny")
    for i, t in enumerate(config.tasks):
        if t.path is not None and not Path(t.path).is_dir():
            loc = ("tasks", i, "path")
            problems.append(f"{_file_for(loc, prov, root)}: {_field_name(loc)}: no such task folder {t.path}")
    return problems
