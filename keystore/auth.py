"""Password verifiers (argon2id) and the rate-limit policy.

Verifiers use argon2-cffi's RFC 9106 "low memory" profile: argon2id, t=3, m=64 MiB, p=4
(RFC 9106 section 4, second recommended option; above OWASP's minimum of m=19 MiB, t=2).
The verifier proves a password; it does not decrypt anything. A user's password is also
the passphrase of that user's LUKS keyslot on their disks, and only that keyslot decrypts.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from keystore.errors import AccountLocked, AuthenticationFailed

if TYPE_CHECKING:
    from argon2 import PasswordHasher


@functools.cache
def default_hasher() -> PasswordHasher:
    """RFC 9106 second recommended option (argon2id, t=3, m=64 MiB, p=4). argon2 is
    imported here, when a password is first hashed or checked: a command that checks no
    password (the live USB rule commands) never loads it."""
    from argon2 import PasswordHasher, profiles

    return PasswordHasher.from_parameters(profiles.RFC_9106_LOW_MEMORY)


@dataclasses.dataclass(frozen=True)
class AuthPolicy:
    """How verifiers are made and how failures are rate-limited.

    After `max_failures` consecutive failures the account is locked for `lockout`; while
    locked, attempts are refused without checking the password. The counter resets only on
    a success, so after a lock expires each further failure locks again at once.
    """

    #: the argon2 hasher verifiers are made with; None: `default_hasher()`
    hasher: PasswordHasher | None = None
    max_failures: int = 5
    lockout: timedelta = timedelta(minutes=15)

    @property
    def effective_hasher(self) -> PasswordHasher:
        """`hasher`, or the default one."""
        return default_hasher() if self.hasher is None else self.hasher

    def hash(self, password: bytes) -> str:
        """A new argon2id PHC string for `password`."""
        return self.effective_hasher.hash(bytes(password))

    def verify(self, verifier: str, password: bytes) -> bool:
        """True if `password` matches; False for a mismatch or an unusable verifier."""
        from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

        try:
            return self.effective_hasher.verify(verifier, bytes(password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, verifier: str) -> bool:
        """True for a verifier weaker than this policy's hasher, never for a stronger one: a
        verifier raised to cover the owner's keyslots (keystore.services.verifier) must not
        be lowered again by the next login through the default policy."""
        from argon2 import extract_parameters
        from argon2.exceptions import InvalidHashError

        try:
            got = extract_parameters(verifier)
        except InvalidHashError:
            return True
        h = self.effective_hasher
        return (
            got.type is not h.type
            or got.memory_cost < h.memory_cost
            or got.time_cost < h.time_cost
            or got.hash_len < h.hash_len
            or got.salt_len < h.salt_len
        )

    def burn(self, password: bytes) -> None:
        """Spend the time of one verification (unknown user: no timing oracle)."""
        self.verify(dummy_verifier(self.effective_hasher), password)

    # The lockout, as arithmetic on the counters the repository stores (failed_attempts,
    # locked_until): the repository counts inside its write transaction, these decide.

    def locked_until(self, stored: datetime | None, now: datetime) -> datetime | None:
        """The lock still in force at `now` (attempts are refused unchecked), else None."""
        return stored if stored is not None and stored > now else None

    def lock_after(self, failures: int, now: datetime) -> datetime | None:
        """Until when `failures` consecutive failures lock the account, None if they do not."""
        return now + self.lockout if failures >= self.max_failures else None


def locked_error(policy: AuthPolicy, name: str, until: datetime, now: datetime) -> AccountLocked:
    """What an attempt on a locked account says: until when, and what can be done."""
    return AccountLocked(
        f"user {name!r} is locked until "
        f"{until.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} (another "
        f"{human_duration((until - now).total_seconds())}) after "
        f"{policy.max_failures} failed attempts; {unlock_hint(name)}"
    )


def failed_error(policy: AuthPolicy, name: str, failures: int | None) -> AuthenticationFailed:
    """What a failed login says: the attempts left, or the lock it caused (`failures` None:
    an unknown user, no count to give)."""
    said = f"authentication failed for user {name!r}"
    lock = human_duration(policy.lockout.total_seconds())
    if failures is None:
        return AuthenticationFailed(
            f"{said}; {policy.max_failures} failures in a row lock an account for {lock}"
        )
    left = policy.max_failures - failures
    if left > 0:
        return AuthenticationFailed(
            f"{said}: {left} attempt{'s' if left != 1 else ''} left before a {lock} lock"
        )
    return AuthenticationFailed(
        f"{said}: the account is now locked for {lock}; {unlock_hint(name)}"
    )


def human_duration(seconds: float) -> str:
    """`15 min`, `14 min 32 s`, `2 h 5 min`, `40 s`: a lock time a person reads at once."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h"] if hours else []
    if minutes:
        parts.append(f"{minutes} min")
    if secs and not hours:
        parts.append(f"{secs} s")
    return " ".join(parts) or "0 s"


def unlock_hint(name: str) -> str:
    """What a locked-out user (or their administrator) can do."""
    return f"wait, or have an administrator run `vmshield user unlock {name}`"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def dummy_verifier(hasher: PasswordHasher) -> str:
    """A constant argon2 PHC string with `hasher`'s parameters, that no password matches.

    Verifying against it costs exactly one verification with those parameters, and
    building it costs nothing: an unknown user takes as long as a wrong password, even in
    a fresh process (a verifier computed on first use would double the first attempt).
    """
    kind = hasher.type.name.lower()
    params = f"m={hasher.memory_cost},t={hasher.time_cost},p={hasher.parallelism}"
    salt = _b64(b"vmshield-no-user"[: hasher.salt_len].ljust(hasher.salt_len, b"\0"))
    digest = _b64(bytes(hasher.hash_len))
    return f"$argon2{kind}$v=19${params}${salt}${digest}"
