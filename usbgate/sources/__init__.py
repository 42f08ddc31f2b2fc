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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from usbgate.errors import RuleSourceError, RuleSyntaxError
from usbgate.rules.policy import Rule, parse_rules


class RuleSource(Protocol):
    """The whitelist of each VM, with change detection."""

    def load(self, vm: str) -> list[Rule]:
        """The VM's rules in order. Raises RuleSourceError if they cannot be read."""
        ...

    def poll(self, vm: str) -> list[Rule] | None:
        """None when nothing changed since the last load/poll, else the new rules.

        Must be cheap (it runs every few milliseconds). Raises RuleSourceError when the rules
        can no longer be read (the gateway then denies everything).
        """
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

    def poll(self, vm: str) -> list[Rule] | None:
        return self.load(vm) if vm in self._dirty else None

    def close(self) -> None:
        pass


class FileRuleSource:
    """Rules in a text file (policy.parse_rules syntax), the same for every VM.

    ``poll`` compares the file's (mtime_ns, size, inode): an ``os.stat`` per poll. Write the
    file atomically (write a temporary file, then rename) so a half-written file is never read.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None

    def _stamp(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise RuleSourceError(f"cannot read rules file {self.path}: {exc.strerror}") from exc
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self, vm: str) -> list[Rule]:
        stamp = self._stamp()
        try:
            text = self.path.read_text()
            rules = parse_rules(text)
        except OSError as exc:
            raise RuleSourceError(f"cannot read rules file {self.path}: {exc.strerror}") from exc
        except RuleSyntaxError as exc:
            raise RuleSourceError(f"rules file {self.path}: {exc}") from exc
        self._seen = stamp
        return rules

    def poll(self, vm: str) -> list[Rule] | None:
        if self._stamp() == self._seen:
            return None
        return self.load(vm)

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
