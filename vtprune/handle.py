"""What every handle that ``vtprune.apply`` returns shares: ``with`` removes the hooks on exit."""

from __future__ import annotations

from typing import Any


class Handle:
    """Context-manager protocol over :meth:`remove` (subclasses implement it, idempotently)."""

    def remove(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
