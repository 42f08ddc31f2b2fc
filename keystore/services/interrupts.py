"""What a workflow does when it is told to stop (Ctrl-C, `kill`, a closed terminal).

Under `deferred_signals()` SIGINT, SIGTERM and SIGHUP are only noted (`Pending.signum`):
the workflow looks between steps it must not cut in half (writing an image, re-keying one
disk), then undoes or finishes what it started (a second Ctrl-C does not cut that short)
and ends with `Interrupted`, whose exit status is 128 + the signal's number (130 for
Ctrl-C), as a shell reports a command a signal ended. SIGKILL cannot be caught: a workflow
that must survive it keeps a journal. Signal handlers can only be set in the main thread;
elsewhere `deferred_signals` notes nothing.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from keystore.errors import KeystoreError

#: the signals that ask a command to stop
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeystoreError):
    """A workflow stopped by a signal, after undoing or finishing what it had to."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@dataclasses.dataclass
class Pending:
    """The first stop signal noted by `deferred_signals`, None while there was none."""

    signum: int | None = None

    @property
    def name(self) -> str:
        return "" if self.signum is None else signal.Signals(self.signum).name


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def deferred_signals(pending: Pending | None = None) -> Iterator[Pending]:
    """Stop signals are noted in the `Pending` yielded (the first one counts) and nothing
    else happens; the caller decides when to stop."""
    noted = pending if pending is not None else Pending()

    def note(signum: int, frame: FrameType | None) -> None:
        if noted.signum is None:
            noted.signum = signum

    if not _main_thread():
        yield noted
        return
    old = {s: signal.signal(s, note) for s in STOP_SIGNALS}
    try:
        yield noted
    finally:
        for s, h in old.items():
            signal.signal(s, h)
