"""An owner's verifier is never a cheaper oracle than the keyslots it guards (issue 20 B5).

The owner's password is also the passphrase of their LUKS keyslots, and the keystore keeps an
argon2id verifier of it. Whoever steals the keystore attacks whichever is cheaper per guess,
so the verifier must cost at least what every keyslot it guards costs:

- an argon2 keyslot (memory m KiB, t passes): the verifier needs memory >= m and time >= t;
- a PBKDF2 keyslot of i iterations: the verifier needs memory x time >= i KiB-passes. One
  PBKDF2-SHA256 iteration and one argon2 pass over 1 KiB cost about the same CPU time here,
  and argon2's memory makes every guess dearer still on a GPU: a conservative exchange rate.

`covering_policy(paths)` reads the keyslot costs of the images (headers only, no password)
and returns an AuthPolicy whose hasher meets them and whose `needs_rehash` is true only for a
verifier below them; authenticating through it upgrades a weaker verifier in the same step
(the repository rehashes after a successful check). A verifier is never downgraded (see
keystore.auth.AuthPolicy.needs_rehash).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import argon2
from argon2 import PasswordHasher

from keystore.auth import AuthPolicy, default_hasher

#: keyslot costs above these are not what vmshield creates; refuse rather than hash forever
MAX_MEMORY_KIB = 4 * 1024 * 1024
MAX_TIME = 1000


@dataclasses.dataclass(frozen=True)
class Floor:
    """What a verifier must at least cost: memory (KiB), passes, memory x passes, lanes."""

    memory_kib: int = 0
    time: int = 0
    work: int = 0
    parallel: int = 1

    def join(self, other: Floor) -> Floor:
        return Floor(
            max(self.memory_kib, other.memory_kib),
            max(self.time, other.time),
            max(self.work, other.work),
            max(self.parallel, other.parallel),
        )


def keyslot_floor(path: str) -> Floor:
    """The floor set by every keyslot of the LUKS image at `path` (read from its header)."""
    from nbd_plugin import luks

    floor = Floor()
    for ks in luks.info(path).get("keyslots", []):
        if ks.get("kdf") == "pbkdf2":
            floor = floor.join(Floor(work=int(ks["iterations"])))
        elif "memory_kib" in ks:
            m, t, p = int(ks["memory_kib"]), int(ks["time"]), int(ks["parallel"])
            floor = floor.join(Floor(m, t, m * t, p))
    return floor


def floor_of(paths: Iterable[str]) -> Floor:
    """The floor of all keyslots of these images (what the verifier guards)."""
    floor = Floor()
    for p in paths:
        floor = floor.join(keyslot_floor(p))
    return floor


def covers(verifier: str, floor: Floor) -> bool:
    """Does the argon2id verifier cost at least `floor`?"""
    try:
        got = argon2.extract_parameters(verifier)
    except argon2.exceptions.InvalidHashError:
        return False
    return (
        got.type is argon2.Type.ID
        and got.memory_cost >= floor.memory_kib
        and got.time_cost >= floor.time
        and got.memory_cost * got.time_cost >= floor.work
    )


def hasher_for(floor: Floor, base: PasswordHasher | None = None) -> PasswordHasher:
    """`base` (default: the default hasher) raised to meet `floor` (memory first as far as
    the keyslots go, then passes)."""
    if base is None:
        base = default_hasher()
    parallel = max(base.parallelism, floor.parallel)
    memory = max(base.memory_cost, floor.memory_kib, 8 * parallel)  # argon2: m >= 8p
    time = max(base.time_cost, floor.time, -(-floor.work // memory))
    if memory > MAX_MEMORY_KIB or time > MAX_TIME:
        raise ValueError(f"a keyslot costs more than a verifier may ({memory} KiB, {time} passes)")
    return PasswordHasher(
        time_cost=time,
        memory_cost=memory,
        parallelism=parallel,
        hash_len=base.hash_len,
        salt_len=base.salt_len,
        type=argon2.Type.ID,
    )


@dataclasses.dataclass(frozen=True)
class CoveringPolicy(AuthPolicy):
    """Hashes at least at `floor`; rehashes only a verifier below it, raising that verifier's
    own parameters just enough (its memory and passes are kept where they already suffice).

    The repository calls `needs_rehash(stored)` after a successful check and then `hash`:
    the parameters of the verifier found below the floor are remembered in between. Making
    a verifier afresh (`set_password`) starts from the default parameters instead."""

    floor: Floor = Floor()
    _below: list[PasswordHasher] = dataclasses.field(
        default_factory=list, repr=False, compare=False
    )

    def needs_rehash(self, verifier: str) -> bool:
        if covers(verifier, self.floor):
            return False
        try:
            base = PasswordHasher.from_parameters(argon2.extract_parameters(verifier))
        except argon2.exceptions.InvalidHashError:
            base = self.effective_hasher
        self._below[:] = [base]
        return True

    def hash(self, password: bytes) -> str:
        base = self._below[0] if self._below else self.effective_hasher
        return hasher_for(self.floor, base).hash(bytes(password))


def covering_policy(paths: Iterable[str]) -> CoveringPolicy:
    """The policy to authenticate an owner with when these images are theirs."""
    floor = floor_of(paths)
    return CoveringPolicy(hasher=hasher_for(floor), floor=floor)
