"""Choosing audit rows to show: by action, actor, VM and time (`vmshield audit` filters).

Patterns are shell-style (`auth.*`, `disk.destroy*`); times are ISO 8601 in UTC
(`2026-12-07`, `2026-12-07T01:30`, `2026-12-07 01:30:00`) or an age (`90s`, `10m`, `2h`,
`3d`: that long ago).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from keystore.models import AuditEntry

_AGE = re.compile(r"(\d+)\s*([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """`--since` / `--until`: an ISO 8601 time (UTC unless it says otherwise) or an age."""
    t = text.strip()
    age = _AGE.fullmatch(t.lower())
    if age:
        seconds = int(age.group(1)) * _UNIT[age.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(t.removesuffix("Z").removesuffix("z"))
    except ValueError:
        raise ValueError(
            f"time {text!r}: use ISO 8601 in UTC (2026-12-07, 2026-12-07T01:30) "
            "or an age (90s, 10m, 2h, 3d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class AuditFilter:
    """Which rows to show; an empty pattern list matches everything."""

    actions: Sequence[str] = ()
    actors: Sequence[str] = ()
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, e: AuditEntry) -> bool:
        if self.actions and not any(fnmatch.fnmatchcase(e.action, p) for p in self.actions):
            return False
        if self.actors and not any(fnmatch.fnmatchcase(e.actor, p) for p in self.actors):
            return False
        ts = e.ts if e.ts.tzinfo else e.ts.replace(tzinfo=UTC)
        if self.since is not None and ts < self.since:
            return False
        return self.until is None or ts <= self.until

    def select(self, rows: Iterable[AuditEntry], limit: int | None = None) -> list[AuditEntry]:
        """The matching rows, oldest first; with `limit`, the most recent `limit` of them."""
        chosen = [e for e in rows if self.matches(e)]
        return chosen[-limit:] if limit else chosen
