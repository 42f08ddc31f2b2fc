"""Passphrases given the nbdkit way: ``+FILE``, ``-FD``, ``-`` (prompt) or a literal.

File and descriptor contents are key files (byte for byte, no newline stripping: the same
bytes ``cryptsetup --key-file`` and QEMU's ``secret,file=`` use); ``-`` prompts on the
terminal and a literal is a line, both under the line rules. The rules are
nbd_plugin.secrets', the same as the `vmshield` command's. A literal on the command line is
visible in ps and in nbdkit's verbose log: it is for tests only.
"""

from __future__ import annotations

import os

from nbd_plugin import secrets


def read_passphrase(value: str) -> bytearray:
    """Resolve a ``passphrase=`` value (SecretError, never holding the passphrase)."""
    if value == "-":
        return secrets.prompt("passphrase: ", "passphrase=-")
    if value.startswith("-") and value[1:].isdigit():
        fd = int(value[1:])
        try:
            return secrets.read_key_fd(fd, f"passphrase=-{fd} (file descriptor {fd})")
        finally:
            if fd > 2:
                os.close(fd)
    if value.startswith("+"):
        return secrets.read_key_file(value[1:], f"passphrase file {value[1:]}")
    return secrets.from_line(bytearray(value.encode()), "passphrase=")
