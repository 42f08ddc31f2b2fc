"""Progress reporting: a no-op base, a rich progress bar, and JSON lines for machines.

The engine calls `start(phase, label, total)`, then `update(done)` with bytes done in that
phase, then `end()`; `event(name, **fields)` carries one-off facts (resumed, refused...).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any


def whole_job_offset(phase: str, total: int, passes: int) -> int | None:
    """Bytes of the whole erase (every overwrite pass, then the read-back) done before
    `phase` begins, each phase being `total` bytes; None for a phase outside that count
    (the crypto-erase, the discard)."""
    if phase.startswith("pass") and phase[4:].isdigit():
        return (int(phase[4:]) - 1) * total
    if phase == "verify":
        return passes * total
    return None


class Reporter:
    """Receives progress; this base ignores it (library use, tests)."""

    def start(self, phase: str, label: str, total: int, done: int = 0) -> None:
        """A phase of `total` bytes begins (`done` of them already done, when resumed)."""

    def update(self, done: int) -> None:
        """`done` bytes of the current phase are finished."""

    def end(self) -> None:
        """The current phase is finished."""

    def event(self, name: str, **fields: Any) -> None:
        """A one-off event."""

    def close(self) -> None:
        """No more reports."""


class JsonLinesReporter(Reporter):
    """One JSON object per line: phase/progress/phase_end/event, progress at most every 0.2 s."""

    def __init__(self, out: IO[str] | None = None, interval: float = 0.2) -> None:
        self._out = out or sys.stdout
        self._interval = interval
        self._phase = ""
        self._total = 0
        self._t0 = 0.0
        self._last = 0.0
        self._done = 0
        self._base = 0

    def _emit(self, obj: dict[str, Any]) -> None:
        self._out.write(json.dumps(obj, sort_keys=True) + "\n")
        self._out.flush()

    def start(self, phase: str, label: str, total: int, done: int = 0) -> None:
        self._phase, self._total, self._done, self._base = phase, total, done, done
        self._t0 = self._last = time.monotonic()
        self._emit({"event": "phase", "phase": phase, "label": label, "total": total})

    def update(self, done: int) -> None:
        self._done = done
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._progress(now)

    def _progress(self, now: float) -> None:
        elapsed = max(now - self._t0, 1e-9)
        rate = (self._done - self._base) / elapsed
        eta = (self._total - self._done) / rate if rate > 0 else None
        self._emit(
            {
                "event": "progress",
                "phase": self._phase,
                "done": self._done,
                "total": self._total,
                "bytes_per_second": round(rate),
                "eta_seconds": None if eta is None else round(eta, 1),
            }
        )

    def end(self) -> None:
        self._progress(time.monotonic())
        self._emit({"event": "phase_end", "phase": self._phase})

    def event(self, name: str, **fields: Any) -> None:
        self._emit({"event": name, **fields})


class RichReporter(Reporter):
    """A rich progress bar per phase with bytes/s and ETA, on stderr; given the number of
    overwrite `passes` (and `verify`), also one for the whole erase, whose ETA covers every
    pass and the read-back."""

    def __init__(self, *, passes: int = 0, verify: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._progress.start()
        self._task: Any = None
        self._passes, self._verify = passes, verify
        self._whole: Any = None
        self._offset: int | None = None

    def start(self, phase: str, label: str, total: int, done: int = 0) -> None:
        self._offset = whole_job_offset(phase, total, self._passes) if self._passes else None
        if self._offset is not None:
            whole = (self._passes + int(self._verify)) * total
            if self._whole is None:
                what = f"all {self._passes} pass(es)" + (" + verify" if self._verify else "")
                self._whole = self._progress.add_task(what, total=max(whole, 1))
            self._progress.update(self._whole, total=max(whole, 1), completed=self._offset + done)
        self._task = self._progress.add_task(label, total=max(total, 1), completed=done)

    def update(self, done: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=done)
        if self._whole is not None and self._offset is not None:
            self._progress.update(self._whole, completed=self._offset + done)

    def end(self) -> None:
        if self._task is not None:
            task = self._progress.tasks[-1]
            self._progress.update(self._task, completed=task.total)
            if self._whole is not None and self._offset is not None:
                self._progress.update(self._whole, completed=self._offset + int(task.total or 0))
        self._task = None

    def event(self, name: str, **fields: Any) -> None:
        if name == "resumed":
            self._console.print(
                f"resuming: {fields.get('phase')} pass {fields.get('pass')}"
                f" at byte {fields.get('done')}"
            )

    def close(self) -> None:
        self._progress.stop()
