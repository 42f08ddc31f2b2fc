"""Passphrases given the nbdkit way: ``+FILE``, ``-FD``, ``-`` (prompt) or a literal.

File and descriptor contents are used byte for byte (no newline stripping), the same bytes
``cryptsetup --key-file`` and QEMU's ``secret,file=`` use. A literal on the command line is
visible in ps and in nbdkit's verbose log: it is for tests only.
"""

from __future__ import annotations

import getpass
import os

MAX_PASSPHRASE = 8192


class PassphraseError(ValueError):
    """The passphrase parameter could not be read."""


def _read_fd(fd: int, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_PASSPHRASE:
            raise PassphraseError(
                f"{what} holds more than {MAX_PASSPHRASE} bytes: not a passphrase"
            )
    return b"".join(chunks)


def read_passphrase(value: str) -> bytes:
    """Resolve a ``passphrase=`` value. Errors never contain the passphrase."""
    if value == "-":
        try:
            with open("/dev/tty", "r+b", buffering=0):
                pass
        except OSError:
            raise PassphraseError(
                "passphrase=- needs a terminal to prompt on; use passphrase=+FILE or passphrase=-FD"
            ) from None
        return getpass.getpass("passphrase: ").encode()
    if value.startswith("-") and value[1:].isdigit():
        fd = int(value[1:])
        try:
            data = _read_fd(fd, f"file descriptor {fd}")
        except OSError as exc:
            raise PassphraseError(
                f"passphrase=-{fd}: cannot read file descriptor {fd}: {exc.strerror}"
            ) from None
        if fd > 2:
            os.close(fd)
        return data
    if value.startswith("+"):
        path = value[1:]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise PassphraseError(f"passphrase file {path}: {exc.strerror}") from None
        try:
            return _read_fd(fd, f"passphrase file {path}")
        finally:
            os.close(fd)
    return value.encode()
