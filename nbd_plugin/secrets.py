"""Reading a secret (a password, a passphrase, a key): one set of rules for every entry point.

The `vmshield` prompts, `--password-file`/`--passphrase-file` and passwords piped on stdin,
the plugin's ``passphrase=`` (+FILE, -FD, -, a literal), the host key and `vm unlock` all
read secrets here. The rules mirror cryptsetup's:

- a key file (a file, an inherited descriptor, a pipe the keystore writes) is taken byte
  for byte: no newline is dropped, NUL bytes are kept (binary keys), at most
  MAX_KEY_FILE bytes (8 KiB: cryptsetup takes up to 8 MiB, but a vmshield secret also
  travels to nbdkit through a pipe written before nbdkit runs, and a pipe holds 64 KiB;
  common key files are 256 to 4096 bytes);
- a line (a hidden prompt on a terminal, one line of a pipe, a literal on a command line)
  loses one trailing newline ("\\n" only: a "\\r" before it stays, as in cryptsetup), may
  hold no NUL byte (no terminal can type one), and is at most MAX_LINE bytes (cryptsetup's
  interactive limit, 512);
- an empty secret is refused either way (cryptsetup: "Nothing to read on input").

Every secret comes back as a bytearray the caller can overwrite (`wipe`); an error never
holds the secret, nor a part of it. New secrets have a policy of their own on top
(keystore.secretpolicy).
"""

from __future__ import annotations

import getpass
import os
from typing import BinaryIO

from nbd_plugin.errors import VmshieldError

#: the longest key file (bytes): far below a pipe's 64 KiB, which `disk serve` fills at once
MAX_KEY_FILE = 8 << 10
#: the longest line secret (bytes, its newline not counted), as cryptsetup's interactive limit
MAX_LINE = 512

__all__ = [
    "MAX_KEY_FILE",
    "MAX_LINE",
    "SecretError",
    "from_key_file",
    "from_line",
    "prompt",
    "read_key_fd",
    "read_key_file",
    "read_line",
    "wipe",
]


class SecretError(VmshieldError, ValueError):
    """A secret could not be read, or breaks the rules above; the message never holds it."""


def wipe(buf: bytearray) -> None:
    """Overwrite a secret buffer (Python may still hold copies; this is what can be done)."""
    buf[:] = bytes(len(buf))


def from_key_file(data: bytearray, what: str) -> bytearray:
    """`data`, the whole content of key file `what`, checked (empty, over MAX_KEY_FILE)."""
    if not data:
        raise SecretError(f"{what} is empty: a secret cannot be empty")
    if len(data) > MAX_KEY_FILE:
        wipe(data)
        raise SecretError(f"{what} holds more than {MAX_KEY_FILE} bytes: not a key file")
    return data


def from_line(data: bytearray, what: str) -> bytearray:
    """`data`, one line typed or piped as `what`, without its newline, checked (empty, NUL,
    over MAX_LINE)."""
    if data.endswith(b"\n"):
        del data[-1]
    problem = None
    if not data:
        problem = "is empty: a secret cannot be empty"
    elif b"\0" in data:
        problem = "holds a NUL byte: a typed or piped secret cannot"
    elif b"\n" in data:
        problem = "holds more than one line"
    elif len(data) > MAX_LINE:
        problem = f"is longer than {MAX_LINE} bytes: use a key file for a longer one"
    if problem is not None:
        wipe(data)
        raise SecretError(f"{what} {problem}")
    return data


def read_key_fd(fd: int, what: str) -> bytearray:
    """Key file `what` from descriptor `fd`, read to its end (never more than the limit + 1)."""
    data = bytearray()
    try:
        while len(data) <= MAX_KEY_FILE:
            chunk = os.read(fd, min(1 << 16, MAX_KEY_FILE + 1 - len(data)))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        wipe(data)
        raise SecretError(f"cannot read {what}: {e.strerror or e}") from None
    return from_key_file(data, what)


def read_key_file(path: str, what: str) -> bytearray:
    """Key file `path` (named `what` in errors), byte for byte."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SecretError(f"cannot read {what}: {e.strerror or e}") from None
    try:
        return read_key_fd(fd, what)
    finally:
        os.close(fd)


def read_line(stream: BinaryIO, what: str) -> bytearray:
    """The next line of `stream` (a pipe on stdin) as `what`; end of input is empty."""
    return from_line(bytearray(stream.readline(MAX_LINE + 2)), what)


def prompt(text: str, what: str) -> bytearray:
    """A hidden prompt on the terminal (/dev/tty), as `what`; SecretError without one."""
    try:
        with open("/dev/tty", "r+b", buffering=0):
            pass
    except OSError:
        raise SecretError(f"{what}: no terminal to prompt on; give the secret in a file") from None
    return from_line(bytearray(getpass.getpass(text).encode()), what)
