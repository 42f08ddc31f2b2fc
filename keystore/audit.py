"""The append-only, hash-chained audit trail.

Row n stores `hash = SHA-256(prev_hash || "\\n" || JSON[seq, ts, actor, action, vm, detail])`
with `prev_hash` the hash of row n-1 (64 zeros for row 1). `verify` recomputes the chain:
an edited row breaks its own hash, a deleted or inserted row breaks the next row's
`prev_hash` and the run of consecutive `seq` numbers, and a deleted tail is caught by the
head (seq, hash) kept in the `meta` table. Triggers refuse UPDATE and DELETE.

What this cannot do: someone who can write the file can drop the triggers and rewrite the
whole chain consistently. Copy the head printed by `vmshield audit verify` somewhere else
(a ticket, a remote log) to anchor it; `verify --head` then checks against that copy.

This module is the chain's pure functions (no database): the storage layer stores the rows
(keystore.storage.repository; keystore.sqlite.audit and keystore.postgres.audit for other
processes). Never put secrets in `detail`: keys that look like secrets are refused.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import hmac
import json
import os
import pwd
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from keystore.errors import AuditChainBroken
from keystore.models import AuditEntry

GENESIS = "0" * 64

_SECRET_WORDS = ("password", "passphrase", "secret", "verifier", "master_key")


def now() -> datetime:
    return datetime.now(UTC)


def os_identity() -> dict[str, Any]:
    """The real uid of this process and the name it maps to (from the password database,
    not from the environment, which the caller controls)."""
    uid = os.getuid()
    try:
        name: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    return {"os_uid": uid, "os_user": name}


def cli_actor() -> str:
    """Who runs this command, for the audit trail: the sudo caller when run by root through
    sudo, else the real user. Every row also records the real uid (`os_identity`), since
    $SUDO_USER is only a claim."""
    user = os.environ.get("SUDO_USER") if os.getuid() == 0 else None
    if not user:
        user = os_identity()["os_user"] or getpass.getuser()
    return f"{user}@cli"


def canonical_detail(detail: dict[str, Any] | None) -> str:
    """Canonical JSON of `detail`; refuses keys that look like secrets (ValueError)."""
    detail = detail or {}
    if not isinstance(detail, dict):
        raise TypeError("audit detail must be a dict")
    for key in detail:
        if any(w in str(key).lower() for w in _SECRET_WORDS):
            raise ValueError(f"audit detail key {key!r} looks like a secret; never store one")
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)


def row_hash(
    prev_hash: str, seq: int, ts: str, actor: str, action: str, vm: str | None, detail: str
) -> str:
    """The chained hash of one row (hex)."""
    body = json.dumps([seq, ts, actor, action, vm, detail], separators=(",", ":"))
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def next_row(
    last: tuple[int, str] | None,
    actor: str,
    action: str,
    vm: str | None,
    detail: dict[str, Any] | None,
) -> tuple[Any, ...]:
    """The next row (seq, ts, actor, action, vm, detail, prev_hash, hash) after the chain's
    current last (seq, hash).

    The detail gets `os_uid` / `os_user` (`os_identity`) of the writing process, whatever
    the actor claims: in every row, of every backend, inside the chained hash.
    """
    if not actor or not action:
        raise ValueError("audit rows need an actor and an action")
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    ts = now().isoformat()
    text = canonical_detail({**(detail or {}), **os_identity()})
    h = row_hash(prev, seq, ts, actor, action, vm, text)
    return (seq, ts, actor, action, vm, text, prev, h)


def entry_from_row(row: Sequence[Any]) -> AuditEntry:
    seq, ts, actor, action, vm, detail, prev, h = row
    fields = json.loads(detail)
    uid, user = fields.pop("os_uid", None), fields.pop("os_user", None)
    return AuditEntry(
        int(seq), datetime.fromisoformat(ts), actor, action, vm, fields, prev, h, uid, user
    )


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """Outcome of a chain check: how many rows, the head, and the problems found."""

    rows: int
    head_seq: int
    head_hash: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_rows(
    rows: list[tuple[Any, ...]], recorded_head: str | None, anchor: str | None = None
) -> VerifyResult:
    """Check a full chain (rows in seq order) against its recorded head and an optional anchor.

    `anchor` is a "SEQ:HASH" head copied earlier: that row must still be in the chain.
    """
    problems: list[str] = []
    prev, expect_seq = GENESIS, 1
    hashes: dict[int, str] = {}
    for row in rows:
        seq, ts, actor, action, vm, detail, prev_hash, h = row
        if seq != expect_seq:
            problems.append(f"rows {expect_seq}..{seq - 1} are missing (deleted)")
        if not hmac.compare_digest(prev_hash, prev):
            problems.append(f"row {seq}: previous-hash link broken (a row before it changed)")
        calc = row_hash(prev_hash, seq, ts, actor, action, vm, detail)
        if not hmac.compare_digest(calc, h):
            problems.append(f"row {seq}: content does not match its hash (edited)")
        prev, expect_seq = h, seq + 1
        hashes[seq] = h
    head_seq = expect_seq - 1
    if recorded_head is not None and recorded_head != f"{head_seq}:{prev}":
        problems.append(
            f"recorded head is {recorded_head} but the chain ends at {head_seq}:{prev} "
            "(rows deleted from the end, or the head was altered)"
        )
    if recorded_head is None and rows:
        problems.append("the recorded head is missing")
    if anchor:
        try:
            a_seq, a_hash = anchor.split(":", 1)
            ok = hmac.compare_digest(hashes.get(int(a_seq), ""), a_hash)
        except ValueError:
            raise ValueError(f"anchor must be SEQ:HASH, got {anchor!r}") from None
        if not ok:
            problems.append(f"anchor {anchor} is not in the chain (history was rewritten)")
    return VerifyResult(len(rows), head_seq, prev, tuple(problems))


def require_valid(result: VerifyResult) -> None:
    """Raise AuditChainBroken listing the problems if the chain did not verify."""
    if not result.ok:
        raise AuditChainBroken("audit chain broken: " + "; ".join(result.problems))
