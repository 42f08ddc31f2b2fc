"""The life of one gateway session as a table: everything that changes a session's state is here.

h11's ``_state.py`` style: states, the events that move them, and one table of
``(state, event) -> new state``. No I/O, no packets: usbgate.relay turns packets into these
events, and usbgate.session does the socket work around it.

    HELLO --hellos--> WAITING --announced--> PROBING --allowed--> ATTACHED
                         ^                      |                    |
                         +------unplugged-------+ denied -> BLOCKED  | qemu_refused -> BLOCKED
                         +------unplugged-------------- BLOCKED <----+
                         +------unplugged------------------------ ATTACHED

    BLOCKED --admitted--> ATTACHED  (live allow: the rules now allow a device still plugged in)

Any state --close--> CLOSED (a hang-up, a malformed packet, a reject, a revocation); CLOSED is
final. An event the table does not list for a state is a ``TransitionError``: the caller turns
the owner's out-of-turn packet into a protocol error, and ignores a late one from QEMU.
"""

from __future__ import annotations

import enum
from typing import Final


class State(enum.Enum):
    """Where a session is in its life."""

    HELLO = "hello"
    """Waiting for both hellos."""
    WAITING = "waiting"
    """No device announced yet (or the last one was unplugged)."""
    PROBING = "probing"
    """A device is announced and held; its descriptors are being read."""
    ATTACHED = "attached"
    """The device was allowed and forwarded to QEMU; packets relay both ways."""
    BLOCKED = "blocked"
    """The device was denied; waiting for the owner to unplug it or hang up."""
    CLOSED = "closed"
    """Both connections are closed."""


class Event(enum.Enum):
    """What happens to a session."""

    HELLOS = "hellos"
    """Both hellos were relayed."""
    ANNOUNCED = "announced"
    """The owner sent device_connect: the device is held and probed."""
    ALLOWED = "allowed"
    """The policy allowed the probed device: it is forwarded to QEMU."""
    DENIED = "denied"
    """The policy (or the probe) denied the device: the owner is told, QEMU sees nothing."""
    UNPLUGGED = "unplugged"
    """The owner sent device_disconnect."""
    QEMU_REFUSED = "qemu_refused"
    """QEMU's own filter= refused the forwarded device (filter_reject from QEMU)."""
    ADMITTED = "admitted"
    """Rules changed to allow a device blocked earlier, still plugged: it is forwarded now."""
    CLOSE = "close"
    """The session ends: hang-up, malformed stream, reject or revocation."""


TRANSITIONS: Final[dict[tuple[State, Event], State]] = {
    (State.HELLO, Event.HELLOS): State.WAITING,
    (State.WAITING, Event.ANNOUNCED): State.PROBING,
    (State.WAITING, Event.UNPLUGGED): State.WAITING,
    (State.PROBING, Event.ALLOWED): State.ATTACHED,
    (State.PROBING, Event.DENIED): State.BLOCKED,
    (State.PROBING, Event.UNPLUGGED): State.WAITING,
    (State.BLOCKED, Event.UNPLUGGED): State.WAITING,
    (State.BLOCKED, Event.ADMITTED): State.ATTACHED,
    (State.ATTACHED, Event.UNPLUGGED): State.WAITING,
    (State.ATTACHED, Event.QEMU_REFUSED): State.BLOCKED,
    **{(state, Event.CLOSE): State.CLOSED for state in State},
}


class TransitionError(RuntimeError):
    """``event`` cannot happen in ``state`` (a programming error unless the peer caused it)."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"{event.value} while {state.value}")
        self.state, self.event = state, event


class SessionState:
    """One session's current state, changed only through ``TRANSITIONS``."""

    def __init__(self) -> None:
        self.state = State.HELLO

    def can(self, event: Event) -> bool:
        return (self.state, event) in TRANSITIONS

    def handle(self, event: Event) -> State:
        """Apply ``event``; returns the new state or raises TransitionError."""
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise TransitionError(self.state, event) from None
        return self.state

    @property
    def attached(self) -> bool:
        return self.state is State.ATTACHED

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED
