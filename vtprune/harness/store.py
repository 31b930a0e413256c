"""The results store: a JSONL file, one record per finished cell, safe against kills.

Each record is one ``os.write`` of one complete line on an ``O_APPEND`` descriptor, followed by ``fsync``: a killed
sweep leaves either the whole line or nothing, and concurrent appenders never interleave inside a line. Readers
still skip a damaged line (e.g. a copy truncated by hand) instead of failing, and report how many they skipped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import VTPruneError


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """NaN/inf are not JSON: store them as ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class ResultsStore:
    """Append-only JSONL of cell records (``record["cell"]`` is the cell hash, ``record["status"]`` ok | error)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.skipped_lines = 0

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, atomically, and flush it to disk."""
        line = (json.dumps(_finite(record), default=_json_default, allow_nan=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a damaged last line must not swallow this one
                line = b"\n" + line
            written = os.write(fd, line)
            while written < len(line):  # only on a full disk or a signal; still one record, in order
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, in file order; damaged lines are counted in :attr:`skipped_lines`."""
        self.skipped_lines = 0
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self.skipped_lines += 1
                continue
            if isinstance(record, dict) and "cell" in record:
                out.append(record)
            else:
                self.skipped_lines += 1
        return out

    def finished(self) -> dict[str, dict[str, Any]]:
        """Cell hash -> its latest successful record (cells that only failed are not finished)."""
        return {r["cell"]: r for r in self.records() if r.get("status") == "ok"}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a results file, or of ``DIR/results.jsonl`` when given a sweep's output folder."""
    path = Path(path)
    file = path / "results.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise VTPruneError(f"no results file at {file}")
    return ResultsStore(file).records()


def write_predictions(out: Path, cell_hash: str, rows: list[dict[str, Any]]) -> str:
    """Per-question predictions of a cell as ``predictions/HASH.jsonl`` (path relative to ``out``)."""
    relative = f"predictions/{cell_hash}.jsonl"
    path = out / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return relative
