"""Reading LUKS passphrases for `vmshield image`: files byte for byte, or a hidden prompt.

Passphrase files are used exactly as `cryptsetup --key-file` uses them (no newline
stripping), so the same file opens the image in cryptsetup, QEMU and nbdkit. Without a file,
a terminal gets a hidden prompt; a pipe on stdin gives one passphrase per line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

MAX_SECRET = 8192
F = TypeVar("F", bound=Callable[..., Any])


class SecretReader:
    """One per command: remembers stdin lines so several secrets can come from a pipe."""

    def __init__(self) -> None:
        self._lines: list[bytes] | None = None

    def read(self, file: Path | None, prompt: str, *, confirm: bool = False) -> bytes:
        if file is not None:
            data = file.read_bytes()
            if len(data) > MAX_SECRET:
                raise click.ClickException(
                    f"{file} holds more than {MAX_SECRET} bytes: not a passphrase file"
                )
            if not data:
                raise click.ClickException(f"{file} is empty: a passphrase cannot be empty")
            return data
        if sys.stdin.isatty():
            value = click.prompt(
                prompt, hide_input=True, confirmation_prompt=confirm, err=True, type=str
            )
            if not value:
                raise click.ClickException("a passphrase cannot be empty")
            return str(value).encode()
        if self._lines is None:
            self._lines = sys.stdin.buffer.read(MAX_SECRET * 4).split(b"\n")
        if not self._lines or not self._lines[0]:
            raise click.ClickException(
                f"{prompt}: expected a line on stdin (or use the matching --*-file option)"
            )
        return self._lines.pop(0).removesuffix(b"\r")


def secret_file_option(name: str, help_text: str):  # type: ignore[no-untyped-def]
    return click.option(
        name,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help=help_text,
    )
