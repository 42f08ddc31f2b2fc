"""Principals of the SQLite repository: verifiers, authentication, rate limiting."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime
from typing import Any

from keystore.auth import human_duration, unlock_hint
from keystore.errors import (
    AccountLocked,
    AlreadyExists,
    AuthenticationFailed,
    Conflict,
    NotFound,
)
from keystore.models import Principal
from keystore.repository import check_name
from keystore.sqlite.base import SqliteBase, dt

_PRINCIPAL_COLS = "name, failed_attempts, locked_until, created, last_login"


def _principal(row: sqlite3.Row) -> Principal:
    name, failed, locked, created, last = tuple(row)
    return Principal(name, failed, dt(locked), datetime.fromisoformat(created), dt(last))


class PrincipalStore(SqliteBase):
    """User records; `authenticate` checks, counts, locks and audits."""

    # -- principals -------------------------------------------------------------------------

    async def add_principal(self, name: str, password: bytes, *, actor: str) -> Principal:
        check_name("user", name)
        verifier = await asyncio.to_thread(self.policy.hash, password)
        async with self._write() as db:
            if await self._exists("SELECT 1 FROM principals WHERE name = ?", name):
                raise AlreadyExists(f"user {name!r} already exists")
            await db.execute(
                "INSERT INTO principals (name, verifier, created) VALUES (?, ?, ?)",
                (name, verifier, self._now()),
            )
            await self._audit(db, actor, "user.add", None, {"user": name})
        return await self.get_principal(name)

    async def set_password(self, name: str, password: bytes, *, actor: str) -> Principal:
        verifier = await asyncio.to_thread(self.policy.hash, password)
        async with self._write() as db:
            cur = await db.execute(
                "UPDATE principals SET verifier = ?, failed_attempts = 0, locked_until = NULL "
                "WHERE name = ?",
                (verifier, name),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no user named {name!r}")
            await self._audit(db, actor, "user.passwd", None, {"user": name})
        return await self.get_principal(name)

    async def get_principal(self, name: str) -> Principal:
        row = await self._one(f"SELECT {_PRINCIPAL_COLS} FROM principals WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"no user named {name!r} (see `vmshield user list`)")
        return _principal(row)

    async def list_principals(self) -> list[Principal]:
        rows = await self._all(f"SELECT {_PRINCIPAL_COLS} FROM principals ORDER BY name")
        return [_principal(r) for r in rows]

    async def authenticate(
        self, name: str, password: bytes, *, actor: str, vm: str | None = None
    ) -> Principal:
        """Check `password` for `name`; count, lock and audit. Raises the opaque
        AuthenticationFailed for an unknown user or a wrong password, AccountLocked while
        locked (without checking the password).

        The attempt is reserved before the (slow) verification, in the same write
        transaction as the lock check: it counts as a failure until it is settled, and the
        reservation that reaches the policy's limit locks the account. So at most the
        remaining attempts can be verified at once, however many processes guess in
        parallel; a success settles by clearing the counter and the lock. `vm` is the VM
        the login is for (its disks are about to be opened), recorded on the audit rows.
        """
        now = self.clock()
        locked_until: str | None = None
        reserved = 0
        async with self._write() as db:
            async with db.execute(
                "SELECT verifier, locked_until FROM principals WHERE name = ?", (name,)
            ) as cur:
                row = await cur.fetchone()
            if row is not None and row[1] is not None and datetime.fromisoformat(row[1]) > now:
                locked_until = str(row[1])
                await self._audit(
                    db,
                    actor,
                    "auth.refused",
                    vm,
                    {"user": name, "reason": "locked", "locked_until": locked_until},
                )
            elif row is not None:
                reserved = await self._reserve_attempt(db, name, now)
        if locked_until is not None:
            until = datetime.fromisoformat(locked_until)
            raise AccountLocked(
                f"user {name!r} is locked until "
                f"{until.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} (another "
                f"{human_duration((until - now).total_seconds())}) after "
                f"{self.policy.max_failures} failed attempts; {unlock_hint(name)}"
            )
        if row is None:
            await asyncio.to_thread(self.policy.burn, password)
            ok = False
        else:
            ok = await asyncio.to_thread(self.policy.verify, row[0], password)
        async with self._write() as db:
            if ok:
                new = None
                if self.policy.needs_rehash(row[0]):  # type: ignore[index]
                    new = await asyncio.to_thread(self.policy.hash, password)
                await db.execute(
                    "UPDATE principals SET failed_attempts = 0, locked_until = NULL, "
                    "last_login = ?, verifier = coalesce(?, verifier) WHERE name = ?",
                    (now.isoformat(), new, name),
                )
                await self._audit(db, actor, "auth.ok", vm, {"user": name})
            elif row is None:
                await self._audit(
                    db, actor, "auth.fail", vm, {"user": name, "reason": "unknown user"}
                )
            else:
                detail: dict[str, Any] = {"user": name, "failed_attempts": reserved}
                if reserved >= self.policy.max_failures:
                    detail["locked_until"] = (now + self.policy.lockout).isoformat()
                await self._audit(db, actor, "auth.fail", vm, detail)
        if not ok:
            raise AuthenticationFailed(self._failure_message(name, reserved if row else None))
        return await self.get_principal(name)

    def _failure_message(self, name: str, failures: int | None) -> str:
        """What a failed login says: the attempts left, or the lock it caused."""
        said = f"authentication failed for user {name!r}"
        lock = human_duration(self.policy.lockout.total_seconds())
        if failures is None:  # unknown user: no count to give
            limit = self.policy.max_failures
            return f"{said}; {limit} failures in a row lock an account for {lock}"
        left = self.policy.max_failures - failures
        if left > 0:
            return f"{said}: {left} attempt{'s' if left != 1 else ''} left before a {lock} lock"
        return f"{said}: the account is now locked for {lock}; {unlock_hint(name)}"

    async def _reserve_attempt(self, db: Any, name: str, now: datetime) -> int:
        """Count one attempt as failed (inside the caller's write transaction); the one that
        reaches the limit locks the account. Returns the new count."""
        async with db.execute(
            "UPDATE principals SET failed_attempts = failed_attempts + 1 "
            "WHERE name = ? RETURNING failed_attempts",
            (name,),
        ) as cur:
            fails = int((await cur.fetchone())[0])
        if fails >= self.policy.max_failures:
            until = (now + self.policy.lockout).isoformat()
            await db.execute("UPDATE principals SET locked_until = ? WHERE name = ?", (until, name))
        return fails

    async def unlock_principal(self, name: str, *, actor: str) -> Principal:
        async with self._write() as db:
            cur = await db.execute(
                "UPDATE principals SET failed_attempts = 0, locked_until = NULL WHERE name = ?",
                (name,),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no user named {name!r}")
            await self._audit(db, actor, "user.unlock", None, {"user": name})
        return await self.get_principal(name)

    async def remove_principal(self, name: str, *, actor: str) -> Principal:
        """Delete user `name` (the verifier goes with it; the audit trail keeps the history).
        Conflict while they own a VM, naming every one: their disks open with their
        password, so a VM is removed or given to another owner first."""
        user = await self.get_principal(name)
        async with self._write() as db:
            async with db.execute(
                "SELECT name FROM vms WHERE owner = ? ORDER BY name", (name,)
            ) as cur:
                owned = [r[0] for r in await cur.fetchall()]
            if owned:
                raise Conflict(
                    f"user {name!r} still owns VM(s) {', '.join(owned)}: remove them first "
                    "(`vmshield vm remove`)"
                )
            await db.execute("DELETE FROM principals WHERE name = ?", (name,))
            await self._audit(db, actor, "user.remove", None, {"user": name})
        return user
