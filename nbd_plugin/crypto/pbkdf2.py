"""Key derivation for keyslots: PBKDF2 (LUKS1, LUKS2) with iteration-time calibration."""

from __future__ import annotations

import hashlib
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from nbd_plugin.errors import UnsupportedError

PBKDF2_HASHES = ("sha1", "sha256", "sha512", "sha384", "sha224", "ripemd160")
MIN_ITERATIONS = 1000
MAX_ITERATIONS = (1 << 31) - 1
"""OpenSSL's PKCS5_PBKDF2_HMAC takes an int (cryptography panics above it, cryptsetup's
uint32 cannot reach OpenSSL either): a header asking for more is refused, never run."""


def check_hash(hash_name: str) -> str:
    """Normalise a LUKS hash spec ("SHA256" -> "sha256") or raise UnsupportedError."""
    name = hash_name.lower()
    if name not in PBKDF2_HASHES:
        raise UnsupportedError(f"hash {hash_name!r} is not supported (use sha1, sha256, sha512)")
    try:
        hashlib.new(name)
    except ValueError:
        raise UnsupportedError(f"hash {hash_name!r} is not available in this OpenSSL") from None
    return name


# cryptography's PBKDF2 (its bundled OpenSSL) ran twice as fast as hashlib's here (Debian's
# OpenSSL 3.0): 200,000 SHA-256 iterations in ~1 s instead of ~2 s. Unlock time is the time
# a VM waits for its disk, so the faster one is used where it has the hash.
_FAST_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),
    "sha224": hashes.SHA224(),
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


SLOW_ITERATIONS = 10_000_000
"""Counts up to this are run without a second thought (iter-time calibrations stay below)."""
MAX_SECONDS = 120.0
"""A larger count is first timed here: more than this many seconds of work is refused."""
_RATES: dict[str, float] = {}


def check_iterations(iterations: int, hash_name: str | None = None) -> None:
    """ValueError unless 1 <= ``iterations`` <= MAX_ITERATIONS, checked before any work.

    With ``hash_name``, also ValueError when the count would take more than MAX_SECONDS on
    this machine (measured once per hash, only for counts above SLOW_ITERATIONS): OpenSSL
    cannot be interrupted once it runs, so a crafted header must not get that far.
    """
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(
            f"PBKDF2 iteration count {iterations} is out of range (1-{MAX_ITERATIONS})"
        )
    if hash_name is None or iterations <= SLOW_ITERATIONS:
        return
    name = check_hash(hash_name)
    if name not in _RATES:
        probe = 200_000
        start = time.perf_counter()
        pbkdf2(name, b"calibration", bytes(32), probe, 32)
        _RATES[name] = probe / max(time.perf_counter() - start, 1e-6)
    seconds = iterations / _RATES[name]
    if seconds > MAX_SECONDS:
        raise ValueError(
            f"PBKDF2 with {iterations} iterations would take ~{seconds / 60:.0f} minutes here "
            f"(more than {MAX_SECONDS / 60:.0f})"
        )


def pbkdf2(hash_name: str, passphrase: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC as LUKS uses it. ValueError for a count or length out of range."""
    name = check_hash(hash_name)
    check_iterations(iterations)
    if length < 1:
        raise ValueError(f"PBKDF2 output length {length} is out of range")
    algorithm = _FAST_HASHES.get(name)
    try:
        if algorithm is None:
            return hashlib.pbkdf2_hmac(name, passphrase, salt, iterations, length)
        kdf = PBKDF2HMAC(algorithm=algorithm, length=length, salt=salt, iterations=iterations)
        return kdf.derive(passphrase)
    except OverflowError:  # a bound of the C library below MAX_ITERATIONS (hashlib: INT_MAX)
        raise ValueError(f"PBKDF2 iteration count {iterations} is too large here") from None


def iterations_for(hash_name: str, milliseconds: int, length: int = 32) -> int:
    """PBKDF2 iterations that take about ``milliseconds`` on this machine (like cryptsetup)."""
    probe = 20000
    start = time.perf_counter()
    pbkdf2(hash_name, b"calibration", b"\0" * 32, probe, length)
    per_second = probe / max(time.perf_counter() - start, 1e-6)
    return max(MIN_ITERATIONS, int(per_second * milliseconds / 1000))
