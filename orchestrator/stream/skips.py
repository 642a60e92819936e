"""Skipped items, counted and reported once.

With ``on_error="skip"`` an item whose blob is missing, corrupt or undecodable is left out of an
epoch; this module keeps the account so that a skip is never silent: every read path counts its
skips by reason, the SDK warns once per pass with a summary (not once per item), and a training
run writes the totals into its lineage. Store outages never reach this ledger: they raise
``StoreUnavailable`` (see ``orchestrator.retry``).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import ItemError

__all__ = ["Skips"]

_EXAMPLES = 5


@dataclass
class Skips:
    """Skip counts by reason plus the first few messages (enough to act on, bounded in size)."""

    by_reason: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    def add(self, exc: ItemError) -> None:
        with self._lock:
            self.by_reason[getattr(exc, "reason", "unreadable")] += 1
            if len(self.examples) < _EXAMPLES:
                self.examples.append(exc.message)

    def merge(self, other: Skips | dict[str, Any]) -> None:
        """Add another ledger (or its ``as_dict``) into this one."""
        data = other.as_dict() if isinstance(other, Skips) else other
        with self._lock:
            self.by_reason.update(data.get("by_reason", {}))
            room = _EXAMPLES - len(self.examples)
            self.examples.extend(list(data.get("examples", []))[:max(0, room)])

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"count": sum(self.by_reason.values()), "by_reason": dict(self.by_reason),
                    "examples": list(self.examples)}

    def summary(self, what: str) -> str:
        """One line for a warning or a log: how many, why, the first example and what to do."""
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.by_reason.items()))
        first = f"; first: {self.examples[0]}" if self.examples else ""
        return (f"skipped {self.count} item(s) of {what} ({reasons}){first}. "
                "Run `orchestrator verify` to list every bad blob, or read with on_error='raise' "
                "to stop at the first one")

    def __getstate__(self) -> dict[str, Any]:
        return self.as_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.merge(state)
