"""Progress of a long stage for a person: a tqdm bar on stderr when it is a terminal, with the
count of the total and, for byte-moving stages, MB/s; a log line (INFO, so ``-v``) when the stage
ends otherwise, so CI logs and ``--json`` output stay clean.

Used by ingest (files probed, media uploaded or packed) and verify (blobs checked).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

log = logging.getLogger("orchestrator.progress")


class Meter:
    """``update(n, nbytes)`` as work completes; ``close()`` (or leave the ``with``) at the end.
    ``show``: draw the bar (default: when ``out``, stderr by default, is a terminal)."""

    def __init__(self, desc: str, total: int, unit: str, *, out: TextIO | None = None,
                 show: bool | None = None, rate_bytes: bool = False) -> None:
        self.desc, self.total, self.unit, self.rate_bytes = desc, total, unit, rate_bytes
        out = out if out is not None else sys.stderr
        self.show = out.isatty() if show is None else show
        self.done = self.nbytes = 0
        self.started = time.monotonic()
        self._bar: Any = None
        if self.show:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=out, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        self.done += n
        self.nbytes += nbytes
        if self._bar is not None:
            if self.rate_bytes:
                self._bar.set_postfix_str(f"{self.nbytes / 1e6:.1f} MB, {self._mb_per_s():.1f} MB/s", refresh=False)
            self._bar.update(n)

    def _mb_per_s(self) -> float:
        return self.nbytes / 1e6 / max(time.monotonic() - self.started, 1e-9)

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        text = f"{self.desc}: {self.done} of {self.total} {self.unit}s in {seconds:.1f} s"
        if self.rate_bytes:
            text += f", {self.nbytes / 1e6:.1f} MB at {self._mb_per_s():.1f} MB/s"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            log.info(self.summary())

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
