"""The results store: a JSONL file, one record per finished cell, safe against kills and concurrent sweeps.

Each record is one ``os.write`` of one complete line on an ``O_APPEND`` descriptor under an exclusive ``flock`` of
the file, followed by ``fsync``: a killed sweep leaves either the whole line or nothing, and concurrent appenders
(several processes or hosts on one output folder) never interleave. Readers take a shared lock, skip a damaged line
(e.g. a copy truncated by hand) and list it in :attr:`ResultsStore.damaged` for the caller to report.

A cell being run is claimed with an exclusive ``flock`` of ``OUTPUT/locks/<cell>.lock`` (:class:`Claim`): another
process skips it, and the OS drops the lock when its process ends, even on ``kill -9``, so a rerun resumes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import VTPruneError

RESULTS_FILE = "results.jsonl"
LOCKS = "locks"
#: damaged lines named one by one in a report; more are counted
SHOWN_DAMAGE = 10


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


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("cell"), str) and value.get("status") in ("ok", "error")


class ResultsStore:
    """Append-only JSONL of cell records (``record["cell"]`` is the cell hash, ``record["status"]`` ok | error)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        #: 1-based numbers of the lines the last :meth:`records` call skipped (not a JSON record)
        self.damaged: list[int] = []
        self._records: list[dict[str, Any]] = []
        self._line_damage: list[int] = []
        self._lines = 0
        self._offset = 0
        self._inode: int | None = None

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, atomically and under the file's exclusive lock, and flush it to disk."""
        line = (json.dumps(_finite(record), default=_json_default, allow_nan=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a damaged last line must not swallow this one
                line = b"\n" + line
            written = os.write(fd, line)
            while written < len(line):  # only on a full disk or a signal; still one record, in order
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)  # closing drops the lock

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, in file order; damaged lines are listed in :attr:`damaged`. Reads only what was
        appended since the last call (the whole file again if it was replaced or truncated)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self._reset(None)
            self.damaged = []
            return []
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # no half-written line from a concurrent append
            except OSError:  # a filesystem without locks can still be read (appends check for them)
                pass
            stat = os.fstat(fd)
            if stat.st_ino != self._inode or stat.st_size < self._offset:
                self._reset(stat.st_ino)
            os.lseek(fd, self._offset, os.SEEK_SET)
            data = b""
            while chunk := os.read(fd, 1 << 20):
                data += chunk
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1  # a last line without its newline is read again next time (see below)
        for line in data[:end].splitlines():
            self._lines += 1
            self._parse(line, self._lines, self._records, self._line_damage)
        self._offset += end
        tail: list[dict[str, Any]] = []
        tail_damage: list[int] = []
        self._parse(data[end:], self._lines + 1, tail, tail_damage)  # a crashed writer's fragment, or a record
        self.damaged = self._line_damage + tail_damage  # written without the newline
        return self._records + tail

    def _reset(self, inode: int | None) -> None:
        self._records, self._line_damage, self._lines, self._offset, self._inode = [], [], 0, 0, inode

    @staticmethod
    def _parse(line: bytes, number: int, records: list[dict[str, Any]], damaged: list[int]) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            record = None
        if _is_record(record):
            records.append(record)
        else:
            damaged.append(number)

    def finished(self) -> dict[str, dict[str, Any]]:
        """Cell hash -> its latest successful record (cells that only failed are not finished)."""
        return successes(self.records())

    def damage_report(self) -> str:
        """The damaged lines of the last read as ``file:line`` (empty when there were none)."""
        if not self.damaged:
            return ""
        shown = ", ".join(f"{self.path}:{n}" for n in self.damaged[:SHOWN_DAMAGE])
        more = f" and {len(self.damaged) - SHOWN_DAMAGE} more" if len(self.damaged) > SHOWN_DAMAGE else ""
        return f"skipped {len(self.damaged)} damaged line(s) that are not a JSON record: {shown}{more}"


def successes(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Cell hash -> its latest successful record among ``records``."""
    return {r["cell"]: r for r in records if r["status"] == "ok"}


def results_file(path: str | Path) -> Path:
    """The results file of ``path``: itself, or ``DIR/results.jsonl`` when given a sweep's output folder."""
    path = Path(path)
    return path / RESULTS_FILE if path.is_dir() else path


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a results file or a sweep's output folder; damaged lines are reported on stderr, and a file with
    no valid record at all is an error (a leaderboard of nothing would hide it)."""
    file = results_file(path)
    if file.is_dir():
        raise VTPruneError(f"{file} is a folder; expected a results file (JSON lines written by vtprune sweep)")
    if not file.is_file():
        raise VTPruneError(f"no results file at {file}")
    store = ResultsStore(file)
    records = store.records()
    if records and store.damaged:
        print(f"vtprune: warning: {store.damage_report()}", file=sys.stderr)
    if not records:
        raise VTPruneError(f"{file} holds no valid record" + (f": {store.damage_report()}" if store.damaged else
                                                              " (it is empty)"))
    return records


def write_predictions(out: Path, cell_hash: str, rows: list[dict[str, Any]]) -> str:
    """Per-question predictions of a cell as ``predictions/HASH.jsonl`` (path relative to ``out``)."""
    relative = f"predictions/{cell_hash}.jsonl"
    path = out / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return relative


def check_output(folder: Path) -> ResultsStore:
    """The store of a sweep's output folder, after checking, before any cell runs, that the folder, its results
    file and its lock folder are what they should be and that the filesystem supports file locks."""
    if folder.exists() and not folder.is_dir():
        raise VTPruneError(f"output folder {folder} is a file; expected a folder (choose another --out or output:)")
    store = ResultsStore(folder / RESULTS_FILE)
    if store.path.exists() and not store.path.is_file():
        raise VTPruneError(f"{store.path} is a folder, not a results file; move it away or choose another --out")
    try:
        Claim(folder, "probe").probe()
    except FileExistsError:
        raise VTPruneError(f"{folder / LOCKS} is a file; the sweep keeps its lock files in that folder: move the "
                           "file away") from None
    except PermissionError as e:
        raise VTPruneError(f"cannot write to output folder {folder}: {e.strerror}") from None
    except OSError as e:
        raise VTPruneError(f"file locks do not work in {folder} ({e.strerror}); the sweep needs them so that "
                           "concurrent runs never evaluate one cell twice: use a local disk, or a network filesystem "
                           "mounted with locking (NFS with lockd or v4, Lustre with -o flock)") from None
    return store


class Claim:
    """An exclusive ``flock`` of ``OUTPUT/locks/NAME.lock``, held while this process works on what NAME names; the
    file holds the holder (pid, host, since when) for messages. Lock files stay: a lock is the flock, not the file."""

    def __init__(self, folder: Path, name: str) -> None:
        self.path = folder / LOCKS / f"{name}.lock"
        self._fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def probe(self) -> None:
        """Take and drop a shared lock: raises ``OSError`` where the filesystem has no working locks."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held exclusively by another process: locks work
            pass
        finally:
            os.close(fd)

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock (waiting for it when ``wait``); ``False`` when another process holds it."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        """Who holds (or last held) the lock, as the holder wrote it."""
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
