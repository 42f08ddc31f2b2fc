"""Progress of a long keystore operation as lines: the step, how far, and an ETA.

`user passwd` (a keyslot per disk, then the verifier) and `disk create` (the password
check, the keyslot's key derivation, the verifier) run for seconds with nothing to show
but their steps. `Progress` words each step with its place and the time left: the
average of the steps done so far, or before any is done the caller's estimate (a keyslot
takes about its --iter-time), whichever is longer: a quick first step must not promise
a quick key derivation. It only makes lines; where they go (stderr on a terminal or
with --progress, never into --json output) is the caller's choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from keystore.auth import human_duration

#: a report callback that shows nothing
Report = Callable[[str], None]


def silent(line: str) -> None:
    """A `Report` that drops the line."""


class Progress:
    """Numbered steps of one operation, each reported as it begins with the time left."""

    def __init__(self, report: Report, total: int, *, estimate: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.report, self.total, self.estimate, self._clock = report, total, estimate, clock
        self._t0 = clock()
        self._done = 0

    def step(self, what: str, *, index: int | None = None) -> None:
        """Step `index` (default: the next one) begins: `[2/5] what (ETA 6 s)`."""
        if index is not None:
            self._done = index - 1
        left = self.left()
        eta = "" if left is None else f" (about {human_duration(max(left, 1.0))} left)"
        self.report(f"[{self._done + 1}/{self.total}] {what}{eta}")
        self._done += 1

    def left(self) -> float | None:
        """Seconds left for the steps not yet done, counting the one about to begin."""
        remaining = self.total - self._done
        average = (self._clock() - self._t0) / self._done if self._done else None
        known = [t for t in (average, self.estimate) if t is not None]
        return max(known) * remaining if known else None

    def finished(self, what: str) -> None:
        self.report(f"{what} in {human_duration(max(self._clock() - self._t0, 1.0))}")
