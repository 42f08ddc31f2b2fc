"""Network-bound disk secrets: Debian's `clevis` encrypts and decrypts keyslot passphrases.

A clevis token in a LUKS2 header (``nbd_plugin.luks.luks2.tokens``) holds a keyslot's
passphrase as a JWE that only its pins can open: a Tang server that answers (the host is on
the right network), this host's TPM2, or a Shamir combination of them (sss). vmshield does
not reimplement the pins: it runs `clevis decrypt` with the JWE on stdin and reads the
passphrase from its stdout pipe, and `clevis encrypt PIN CONFIG` with the new passphrase on
stdin. The passphrase is never in argv, the environment, a file, a log or the keystore; an
error names the pins (a Tang URL) and what to do, never the passphrase.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass

from keystore.errors import KeystoreError
from nbd_plugin.secrets import SecretError, from_key_file

TIMEOUT = 30.0  # clevis tang's curl gives up on an unreachable server well before this
#: random keyslot passphrase: 256 bits, as `clevis luks bind` makes (pwmake 256), in hex
PASSPHRASE_BYTES = 32
#: PBKDF2 iterations of a bound keyslot, as `clevis luks bind` (--pbkdf-force-iterations 1000):
#: its passphrase is random, stretching adds nothing, and an unattended start stays fast
BOUND_KEYSLOT_ITERATIONS = 1000
#: what the pins need from the environment (tpm2-tools' TCTI for a software TPM); no secrets
_PASSED_ENV = ("PATH", "TPM2TOOLS_TCTI", "TSS2_LOG")


class ClevisError(KeystoreError):
    """clevis could not encrypt or decrypt (a Tang server down, a TPM that refuses, a
    tampered JWE); the message names the pins and what to do."""


def _clevis(*args: str, data: bytes, timeout: float) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("clevis")
    if exe is None:
        raise ClevisError("clevis not found: install the clevis, clevis-luks and tang packages")
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/bin:/bin")
    env["LANG"] = "C"
    try:
        return subprocess.run(
            [exe, *args],
            input=data,
            capture_output=True,
            timeout=timeout,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise ClevisError(f"clevis {args[0]} did not finish within {timeout:.0f} s") from None


def _said(proc: subprocess.CompletedProcess[bytes]) -> str:
    lines = proc.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


def decrypt(jwe_compact: bytes, what: str, *, timeout: float = TIMEOUT) -> bytearray:
    """The secret a clevis JWE holds; ClevisError naming ``what`` (its pins) if not."""
    proc = _clevis("decrypt", data=jwe_compact, timeout=timeout)
    if proc.returncode != 0 or not proc.stdout:
        raise ClevisError(f"{what} did not give the key ({_said(proc)})")
    try:  # a key, taken byte for byte by the key-file rules (nbd_plugin.secrets)
        return from_key_file(bytearray(proc.stdout), f"the key {what} gave")
    except SecretError as e:
        raise ClevisError(str(e)) from None


def encrypt(pin: str, config: dict[str, object], secret: bytes, *, trust: bool) -> bytes:
    """``clevis encrypt PIN CONFIG`` of ``secret``: the compact JWE. ``trust``: accept a Tang
    server's keys without a thumbprint in ``config`` (clevis' ``-y``)."""
    args = ["encrypt", pin, json.dumps(config, separators=(",", ":"))]
    if trust:
        args.append("-y")
    proc = _clevis(*args, data=secret, timeout=TIMEOUT)
    if proc.returncode != 0 or not proc.stdout:
        raise ClevisError(f"clevis encrypt {pin} failed: {_said(proc)}")
    return proc.stdout.strip()


def new_passphrase() -> bytearray:
    """A random keyslot passphrase (hex text: clevis and cryptsetup handle it as typed)."""
    return bytearray(secrets.token_hex(PASSPHRASE_BYTES).encode())


@dataclass
class TokenKey:
    """A keyslot passphrase recovered from a clevis token."""

    keyslot: int
    passphrase: bytearray
    pins: str

    def wipe(self) -> None:
        self.passphrase[:] = bytes(len(self.passphrase))


def unlock_with_token(path: str, *, timeout: float = TIMEOUT) -> TokenKey | None:
    """The passphrase of the first clevis-bound keyslot whose pins answer; None if the image
    has no clevis token; ClevisError naming every pin that did not answer."""
    from nbd_plugin import luks
    from nbd_plugin.errors import VmshieldError

    try:
        tokens = [t for t in luks.clevis_tokens(path) if t.keyslots]
    except (VmshieldError, OSError) as e:
        raise ClevisError(f"{path}: cannot read its clevis tokens: {e}") from e
    failed: list[str] = []
    for token in tokens:
        pins = token.pins()
        try:
            secret = decrypt(token.compact(), f"clevis token {token.id} ({pins})", timeout=timeout)
        except ClevisError as e:
            failed.append(str(e))
            continue
        return TokenKey(token.keyslots[0], secret, pins)
    if not tokens:
        return None
    raise ClevisError("; ".join(failed))
