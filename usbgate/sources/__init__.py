"""Where the gateway gets its rules and where it writes its decisions.

``RuleSource``: the ordered rules of a VM, and a cheap ``poll`` that returns the new rules only
when they changed. The gateway polls every 10 ms, so a change reaches every attached device
within one poll interval plus the time to act (the 50 ms target). ``AuditSink``: where every
decision goes; ``record`` must not block the event loop.

The keystore-backed implementations live in usbgate.sources.keystore (SQLite) and
usbgate.sources.postgres, the only usbgate modules that import the keystore; the ones here need no
database (tests, and hosts that keep the whitelist in a text file).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from usbgate.errors import RuleSourceError, RuleSyntaxError
from usbgate.rules.policy import Rule, parse_rules


class RuleSource(Protocol):
    """The whitelist of each VM, with change detection."""

    def load(self, vm: str) -> list[Rule]:
        """The VM's rules in order. Raises RuleSourceError if they cannot be read."""
        ...

    async def aload(self, vm: str) -> list[Rule]:
        """``load`` without holding up the event loop for a round trip to a remote store
        (one process serving many VMs must not stall the others while it adds one)."""
        ...

    def poll(self, vm: str) -> list[Rule] | None:
        """None when nothing changed since the last load/poll, else the new rules.

        Must be cheap (it runs every few milliseconds). Raises RuleSourceError when the rules
        can no longer be read (the gateway then denies everything).
        """
        ...

    def poll_many(self, vms: Iterable[str]) -> dict[str, list[Rule] | RuleSourceError]:
        """``poll`` of every VM in ``vms`` at once (one check of the store, not one per VM):
        only the VMs whose rules changed (their new rules) or cannot be read (the error)."""
        ...

    def forget(self, vm: str) -> None:
        """Stop watching ``vm`` (a VM removed from a running `usbgate host`)."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


class AuditSink(Protocol):
    """Receives every gateway decision (allowed, denied, revoked, malformed, ...)."""

    def record(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        """Queue one audit row; never blocks the caller for I/O."""
        ...

    async def aclose(self) -> None:
        """Write what is queued, then stop."""
        ...


class MemoryRuleSource:
    """Rules held in memory; ``set`` replaces a VM's rules (tests, embedding)."""

    def __init__(self, rules: dict[str, Sequence[Rule]] | None = None) -> None:
        self._rules = {vm: list(r) for vm, r in (rules or {}).items()}
        self._dirty: set[str] = set()

    def set(self, vm: str, rules: Sequence[Rule]) -> None:
        self._rules[vm] = list(rules)
        self._dirty.add(vm)

    def load(self, vm: str) -> list[Rule]:
        self._dirty.discard(vm)
        return list(self._rules.get(vm, []))

    async def aload(self, vm: str) -> list[Rule]:
        return self.load(vm)

    def poll(self, vm: str) -> list[Rule] | None:
        return self.load(vm) if vm in self._dirty else None

    def poll_many(self, vms: Iterable[str]) -> dict[str, list[Rule] | RuleSourceError]:
        return {vm: self.load(vm) for vm in vms if vm in self._dirty}

    def forget(self, vm: str) -> None:
        self._dirty.discard(vm)

    def close(self) -> None:
        pass


class FileRuleSource:
    """Rules in a text file (policy.parse_rules syntax), the same for every VM.

    ``poll`` compares the file's (mtime_ns, size, inode) with what each VM last saw: an
    ``os.stat`` per poll (one for every VM in ``poll_many``), the file parsed once per change.
    Write the file atomically (write a temporary file, then rename) so a half-written file is
    never read.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: dict[str, tuple[int, int, int]] = {}  # by VM
        self._parsed: tuple[tuple[int, int, int], list[Rule]] | None = None

    def _stamp(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise RuleSourceError(f"cannot read rules file {self.path}: {exc.strerror}") from exc
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _rules(self, stamp: tuple[int, int, int]) -> list[Rule]:
        if self._parsed is None or self._parsed[0] != stamp:
            try:
                rules = parse_rules(self.path.read_text())
            except OSError as exc:
                raise RuleSourceError(
                    f"cannot read rules file {self.path}: {exc.strerror}"
                ) from exc
            except RuleSyntaxError as exc:
                raise RuleSourceError(f"rules file {self.path}: {exc}") from exc
            self._parsed = (stamp, rules)
        return list(self._parsed[1])

    def load(self, vm: str) -> list[Rule]:
        stamp = self._stamp()
        rules = self._rules(stamp)
        self._seen[vm] = stamp
        return rules

    async def aload(self, vm: str) -> list[Rule]:
        return self.load(vm)  # a stat and a small local file

    def poll(self, vm: str) -> list[Rule] | None:
        if self._stamp() == self._seen.get(vm):
            return None
        return self.load(vm)

    def poll_many(self, vms: Iterable[str]) -> dict[str, list[Rule] | RuleSourceError]:
        try:
            stamp = self._stamp()
            changed = [vm for vm in vms if self._seen.get(vm) != stamp]
            rules = self._rules(stamp) if changed else []
        except RuleSourceError as exc:
            return {vm: exc for vm in vms}
        for vm in changed:
            self._seen[vm] = stamp
        return {vm: list(rules) for vm in changed}

    def forget(self, vm: str) -> None:
        self._seen.pop(vm, None)

    def close(self) -> None:
        pass


class MemoryAuditSink:
    """Keeps the rows in a list (tests); ``rows`` is (action, vm, detail)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, Any]]] = []

    def record(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        self.rows.append((action, vm, dict(detail)))

    def actions(self) -> list[str]:
        return [row[0] for row in self.rows]

    async def aclose(self) -> None:
        pass
