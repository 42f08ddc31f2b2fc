"""usbgate.state alone: the session's transition table, and that nothing else writes a state."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import usbgate
from usbgate.state import TRANSITIONS, Event, SessionState, State, TransitionError


def reachable() -> set[State]:
    seen, todo = {State.HELLO}, [State.HELLO]
    while todo:
        state = todo.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is state and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


def test_the_life_of_a_session() -> None:
    machine = SessionState()
    assert machine.state is State.HELLO
    steps = [(Event.HELLOS, State.WAITING), (Event.ANNOUNCED, State.PROBING),
             (Event.ALLOWED, State.ATTACHED), (Event.UNPLUGGED, State.WAITING),
             (Event.ANNOUNCED, State.PROBING), (Event.DENIED, State.BLOCKED),
             (Event.UNPLUGGED, State.WAITING), (Event.ANNOUNCED, State.PROBING),
             (Event.ALLOWED, State.ATTACHED), (Event.QEMU_REFUSED, State.BLOCKED),
             (Event.CLOSE, State.CLOSED)]  # fmt: skip
    for event, want in steps:
        assert machine.handle(event) is want
    assert machine.closed and not machine.attached


def test_every_state_is_reachable_and_can_close() -> None:
    assert reachable() == set(State)
    for state in State:
        assert TRANSITIONS[(state, Event.CLOSE)] is State.CLOSED


def test_closed_is_final() -> None:
    assert [e for (s, e) in TRANSITIONS if s is State.CLOSED] == [Event.CLOSE]


@pytest.mark.parametrize(
    ("state", "event"),
    [(State.HELLO, Event.ANNOUNCED), (State.WAITING, Event.ALLOWED),
     (State.ATTACHED, Event.ANNOUNCED), (State.BLOCKED, Event.ALLOWED),
     (State.PROBING, Event.QEMU_REFUSED), (State.CLOSED, Event.HELLOS),
     (State.WAITING, Event.QEMU_REFUSED)],
)  # fmt: skip
def test_events_out_of_turn_are_refused_and_change_nothing(state: State, event: Event) -> None:
    machine = SessionState()
    machine.state = state
    assert not machine.can(event)
    with pytest.raises(TransitionError, match=event.value):
        machine.handle(event)
    assert machine.state is state


def test_only_the_table_writes_a_session_state() -> None:
    """h11's rule: everything that changes the state machine lives in usbgate/state.py."""
    writers = []
    for path in Path(usbgate.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "state":
                    writers.append(f"{path.name}:{node.lineno}")
    assert all(w.startswith("state.py:") for w in writers), writers
