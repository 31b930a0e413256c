"""The state a sweep shares with its backends while it runs (:class:`SweepRun`): the cells, the results store, the
records seen so far and the per-cell claims, so that the local and the lmms-eval backend (:mod:`.runner`,
:mod:`.lmms_eval_backend`) run and record cells the same way without importing each other.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .cells import Cell, baseline_of
from .parallel import Parallel
from .schema import SweepConfig
from .store import Claim, ResultsStore

#: seconds between two looks at a baseline that another process is running
POLL_S = 1.0


@dataclass
class SweepRun:
    """State shared by the backends while a sweep runs."""

    config: SweepConfig
    cells: list[Cell]
    store: ResultsStore
    finished: dict[str, dict[str, Any]]
    context: dict[str, Any]
    par: Parallel
    bar: Any = None
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})
    #: cells skipped because another process ran them (or runs them) while this sweep ran
    elsewhere: int = 0
    #: cells with a record appended since this sweep started, by any process (ok or error: neither runs again)
    recorded: set[str] = field(default_factory=set)
    #: records of the store already looked at
    seen: int = 0

    @property
    def out(self) -> Path:
        return self.config.output_dir

    def baseline_for(self, cell: Cell) -> tuple[str, dict[str, Any] | None]:
        """(baseline cell hash, its successful record or ``None``)."""
        base = baseline_of(cell, self.cells)
        return base.hash, self.finished.get(base.hash)

    def refresh(self) -> None:
        """Pick up the records other processes appended since the last look (rank 0)."""
        records = self.store.records()
        for record in records[self.seen:]:
            self.recorded.add(record["cell"])
            if record["status"] == "ok":
                self.finished[record["cell"]] = record
        self.seen = len(records)

    def _try_claim(self, cell: Cell, claim: Claim) -> str:
        """``run`` (claimed: this process runs it), ``busy`` (another process runs it) or ``done`` (recorded)."""
        if not claim.acquire():
            return "busy"
        self.refresh()
        if cell.hash in self.finished or cell.hash in self.recorded:
            claim.release()
            return "done"
        return "run"

    @contextmanager
    def claim(self, cell: Cell) -> Iterator[bool]:
        """Hold the cell's lock while the body runs it; yields ``False`` (on every rank) when another process runs
        it or has recorded it. Rank 0 locks and tells the other ranks; a baseline held elsewhere is waited for."""
        lock = Claim(self.out, cell.hash) if self.par.is_main else None
        waiting = False
        while True:
            state = self.par.broadcast(self._try_claim(cell, lock) if lock else None)
            if state != "busy" or not cell.setting.is_baseline:
                break
            if lock and not waiting:
                tqdm.write(f"[vtprune sweep] waiting for {cell.label}: its record is needed next, and "
                           f"{lock.holder()} is running it", file=sys.stderr)
                waiting = True
            time.sleep(POLL_S)  # a poll, not a blocking lock: the other ranks wait in a collective meanwhile
        if state != "run":
            self.elsewhere += 1
            yield False
            return
        try:
            yield True
        finally:
            if lock:
                lock.release()

    @contextmanager
    def claim_all(self, cells: list[Cell]) -> Iterator[list[Cell]]:
        """Claim each of ``cells`` in order (see :meth:`claim`) and hold the claimed ones while the body runs."""
        with ExitStack() as stack:
            yield [c for c in cells if stack.enter_context(self.claim(c))]

    def emit(self, record: dict[str, Any]) -> None:
        """Append a record (rank 0 only) and remember successes for later cells' retention."""
        if not self.par.is_main:
            return
        self.store.append(record)
        self.counts[record["status"]] += 1
        if record["status"] == "ok":
            self.finished[record["cell"]] = record
        else:
            tqdm.write(f"[vtprune sweep] cell failed: {record['model']} | {record['task']} | {record['method']} "
                       f"keep={record['keep']}: {record['error']}", file=sys.stderr)
