"""Argon2 key derivation for LUKS2 keyslots (argon2i, argon2id; version 0x13) and calibration.

LUKS2 stores a keyslot's Argon2 costs as ``time`` (passes), ``memory`` (KiB) and ``cpus``
(lanes); the derived key is as long as the keyslot's ``key_size``. argon2-cffi's
``hash_secret_raw`` computes exactly the reference function cryptsetup uses.
"""

from __future__ import annotations

import os
import time

from argon2.low_level import ARGON2_VERSION, Type, hash_secret_raw

from nbd_plugin.errors import UnsupportedError

TYPES = {"argon2i": Type.I, "argon2id": Type.ID}
# cryptsetup's limits (lib/utils_pbkdf.c): time >= 4 when created, memory 32 KiB - 4 GiB,
# at most 4 lanes when created. Reading accepts what the Argon2 reference accepts within them.
MIN_TIME = 4
MIN_MEMORY_KIB = 32
MAX_MEMORY_KIB = 4 * 1024 * 1024
DEFAULT_MEMORY_KIB = 1024 * 1024
MAX_PARALLEL = 4
MAX_TIME = 1 << 24


SLOW_WORK = 64 * DEFAULT_MEMORY_KIB
"""time x memory (KiB passes) up to this runs without a second thought: 64 passes of 1 GiB."""
MAX_SECONDS = 120.0
"""More work is first timed here: more than this many seconds is refused."""
_PER_KIB_PASS: dict[str, float] = {}


def check_costs(kind: str, time_cost: int, memory_kib: int, parallel: int) -> None:
    """UnsupportedError for an unknown Argon2 variant, ValueError for out-of-range costs.

    Costs within the limits but above SLOW_WORK are timed first (one small derivation, once
    per variant): more than MAX_SECONDS of work is refused, since the C code cannot be
    interrupted once it runs.
    """
    if kind not in TYPES:
        raise UnsupportedError(f"PBKDF {kind!r} is not supported (argon2i, argon2id, pbkdf2)")
    if not 1 <= time_cost <= MAX_TIME:
        raise ValueError(f"argon2 time cost {time_cost} is out of range (1-{MAX_TIME})")
    if not 1 <= parallel <= 16:
        raise ValueError(f"argon2 parallel cost {parallel} is out of range (1-16)")
    if not max(MIN_MEMORY_KIB, 8 * parallel) <= memory_kib <= MAX_MEMORY_KIB:
        raise ValueError(
            f"argon2 memory {memory_kib} KiB is out of range ({MIN_MEMORY_KIB}-{MAX_MEMORY_KIB})"
        )
    work = time_cost * memory_kib
    if work <= SLOW_WORK:
        return
    if kind not in _PER_KIB_PASS:
        probe = 16 * 1024
        _PER_KIB_PASS[kind] = _seconds(kind, 1, probe, 1) / probe
    seconds = work * _PER_KIB_PASS[kind] / max(1, min(parallel, os.cpu_count() or 1))
    if seconds > MAX_SECONDS:
        raise ValueError(
            f"argon2 with time {time_cost} and {memory_kib} KiB would take ~{seconds / 60:.0f} "
            f"minutes here (more than {MAX_SECONDS / 60:.0f})"
        )


def derive(
    kind: str,
    passphrase: bytes,
    salt: bytes,
    time_cost: int,
    memory_kib: int,
    parallel: int,
    length: int,
) -> bytes:
    """Argon2 (``kind`` = "argon2i" / "argon2id") of ``passphrase``: ``length`` bytes."""
    check_costs(kind, time_cost, memory_kib, parallel)
    return hash_secret_raw(
        passphrase,
        salt,
        time_cost=time_cost,
        memory_cost=memory_kib,
        parallelism=parallel,
        hash_len=length,
        type=TYPES[kind],
        version=ARGON2_VERSION,
    )


def default_parallel() -> int:
    return max(1, min(MAX_PARALLEL, os.cpu_count() or 1))


def default_memory_kib() -> int:
    """1 GiB, or half the physical memory when that is less (as cryptsetup does)."""
    try:
        half = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2048
    except (ValueError, OSError):
        half = DEFAULT_MEMORY_KIB
    return max(MIN_MEMORY_KIB, min(DEFAULT_MEMORY_KIB, half))


def _seconds(kind: str, time_cost: int, memory_kib: int, parallel: int) -> float:
    start = time.perf_counter()
    derive(kind, b"calibration", bytes(32), time_cost, memory_kib, parallel, 32)
    return max(time.perf_counter() - start, 1e-6)


def calibrate(kind: str, milliseconds: int, max_memory_kib: int, parallel: int) -> tuple[int, int]:
    """(time, memory KiB) taking about ``milliseconds`` here, like cryptsetup's benchmark.

    Memory stays at ``max_memory_kib`` and passes grow from 4 while that is fast enough;
    when 4 passes over the full memory already take too long, memory shrinks instead.
    """
    target = milliseconds / 1000
    memory = max_memory_kib
    # Probe with a small memory first so a slow machine does not spend seconds measuring.
    probe_mem = max(MIN_MEMORY_KIB, 8 * parallel, min(memory, 64 * 1024))
    per_kib_pass = _seconds(kind, 1, probe_mem, parallel) / probe_mem
    if per_kib_pass * memory * MIN_TIME > target:
        memory = int(target / (per_kib_pass * MIN_TIME))
        memory = max(MIN_MEMORY_KIB, 8 * parallel, min(memory, max_memory_kib))
        return MIN_TIME, memory
    per_pass = _seconds(kind, 1, memory, parallel)
    return max(MIN_TIME, min(MAX_TIME, int(target / per_pass))), memory
