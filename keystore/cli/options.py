"""Shared click options and helpers for the keystore commands: --db, --json, passwords,
running a coroutine against the repository, and turning keystore errors into messages.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from keystore import paths
from keystore.auth import check_password_quality
from keystore.backends import Location, open_repository, parse_location
from keystore.errors import (
    AccountLocked,
    AuthenticationFailed,
    KeystoreBusy,
    KeystoreError,
)
from keystore.postgres.url import PgUrl
from keystore.repository import Repository

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: largest password / passphrase file accepted (same limit as the disk side)
MAX_SECRET = 8192

#: sysexits.h codes, so scripts can tell "try again" from "wrong input"
EX_TEMPFAIL = 75
EX_NOPERM = 77


class KeystoreClickError(click.ClickException):
    """`Error: MESSAGE` with a chosen exit status (e.g. EX_NOPERM, EX_TEMPFAIL)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        vars(self)["exit_code"] = exit_code  # click declares exit_code on the class


class BusyError(click.ClickException):
    """The keystore stayed locked by another process: try again (exit status 75)."""

    exit_code = EX_TEMPFAIL


class DeniedError(click.ClickException):
    """Authentication failed or the account is locked (exit status 77)."""

    exit_code = EX_NOPERM


class DbLocation(click.ParamType):  # type: ignore[type-arg]
    """`--db` values: a postgresql:// URL stays text (a Path would fold its `//`), else a path."""

    name = "PATH|URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and isinstance(parse_location(value), PgUrl):
            return PgUrl(value)
        return click.Path(dir_okay=False, path_type=Path).convert(value, param, ctx)


def db_option(f: F) -> F:
    """`--db PATH|URL` (env VMSHIELD_DB): an SQLite file, or a postgresql:// URL."""
    return click.option(
        "--db",
        "db",
        type=DbLocation(),
        envvar=paths.DB_ENV,
        default=None,
        show_envvar=True,
        help="Keystore database: an SQLite file (default: /var/lib/vmshield/keystore.db for "
        "root, ~/.local/share/vmshield/keystore.db otherwise), or a PostgreSQL URL shared by "
        "several hosts (postgresql://USER@HOST/DB; password in ~/.pgpass, never in the URL).",
    )(f)


def json_option(f: F) -> F:
    """`--json`: machine-readable output."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def password_file_option(f: F) -> F:
    """`--password-file FILE`."""
    return click.option(
        "--password-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Read the password from FILE, byte for byte (no trailing newline: write it "
        "with printf '%s'), as cryptsetup --key-file does. Without it, a pipe on stdin "
        "gives one password per line; a terminal gets a hidden prompt.",
    )(f)


def kdf_options(f: F) -> F:
    """`--iter-time MS` and `--pbkdf-iterations N` for commands that write LUKS keyslots."""
    f = click.option(
        "--pbkdf-iterations",
        type=click.IntRange(min=1000),
        metavar="N",
        help="Force N PBKDF2 iterations instead of timing (weakens the keyslot; tests and "
        "slow machines).",
    )(f)
    return click.option(
        "--iter-time",
        type=click.IntRange(min=1),
        default=2000,
        show_default=True,
        metavar="MS",
        help="PBKDF2 time for the new keyslot, in milliseconds (as cryptsetup's --iter-time).",
    )(f)


def resolve_db(db: Location | None) -> Path:
    """The keystore file, for commands that only work on a local SQLite keystore."""
    if isinstance(db, PgUrl):
        raise click.UsageError(
            f"this command needs a local keystore file, not {db.redacted()}", ctx=None
        )
    return db if db is not None else paths.default_db_path()


def resolve_location(db: Location | None) -> Location:
    """The keystore as given (file or PostgreSQL URL), or the default file."""
    return db if db is not None else paths.default_db_path()


def actor() -> str:
    """Who runs this command, for the audit trail (the sudo caller if any)."""
    user = os.environ.get("SUDO_USER") or getpass.getuser()
    return f"{user}@cli"


def fail(exc: Exception) -> click.ClickException:
    """Map a keystore/value error to a ClickException with a sysexits status."""
    if isinstance(exc, KeystoreBusy):
        return BusyError(str(exc))
    if isinstance(exc, AuthenticationFailed | AccountLocked):
        return DeniedError(str(exc))
    return click.ClickException(str(exc))


def run(db: Location | None, fn: Callable[[Repository], Awaitable[T]]) -> T:
    """Open the keystore, await `fn(repo)`, close it. Errors become ClickExceptions."""

    async def go() -> T:
        repo = await open_repository(resolve_location(db))
        try:
            return await fn(repo)
        finally:
            await repo.close()

    try:
        return asyncio.run(go())
    except (KeystoreError, ValueError) as e:
        raise fail(e) from e


def handle_errors(f: F) -> F:
    """Decorator: KeystoreError / ValueError raised by a command become clean messages."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except (KeystoreError, ValueError) as e:
            raise fail(e) from e

    return wrapper  # type: ignore[return-value]


# -- passwords ---------------------------------------------------------------------------


def _strip_eol(data: bytes) -> bytearray:
    line = data.split(b"\n", 1)[0]
    return bytearray(line.removesuffix(b"\r"))


class PasswordSource:
    """Reads passwords from --password-file (byte for byte), else stdin when it is not a
    terminal (one per line), else a hidden prompt.

    Several reads from stdin take one line each (e.g. current then new password).
    """

    def __init__(self, password_file: Path | None) -> None:
        self.password_file = password_file
        self._stdin_lines: list[bytes] | None = None

    def _from_stdin(self) -> bytearray:
        if self._stdin_lines is None:
            self._stdin_lines = sys.stdin.buffer.read().split(b"\n")
        if not self._stdin_lines or (len(self._stdin_lines) == 1 and not self._stdin_lines[0]):
            raise click.ClickException("expected a password on stdin, got end of input")
        return _strip_eol(self._stdin_lines.pop(0))

    def read(self, prompt: str, *, confirm: bool = False, file: Path | None = None) -> bytearray:
        """One password as a bytearray (the caller should zero it when done)."""
        file = file or self.password_file
        if file is not None:
            try:
                data = file.read_bytes()
            except OSError as e:
                raise click.ClickException(f"cannot read password file {file}: {e}") from e
            if len(data) > MAX_SECRET or not data:
                raise click.ClickException(f"password file {file} is empty or too large")
            return bytearray(data)
        if not sys.stdin.isatty():
            return self._from_stdin()
        text = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
        return bytearray(str(text).encode())

    def read_new(self, prompt: str, *, file: Path | None = None) -> bytearray:
        """A new password: confirmed when prompted, checked for length."""
        pw = self.read(prompt, confirm=True, file=file)
        try:
            check_password_quality(bytes(pw))
        except ValueError as e:
            hint = ""
            if (file or self.password_file) and pw.endswith(b"\n"):
                hint = " (the file ends with a newline: write it with printf '%s')"
            wipe(pw)
            raise click.ClickException(f"{e}{hint}") from e
        return pw


def wipe(buf: bytearray) -> None:
    """Overwrite a secret buffer (Python may still hold copies; this is what can be done)."""
    buf[:] = b"\0" * len(buf)


# -- output ------------------------------------------------------------------------------


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def table(rows: list[list[str]], headers: list[str]) -> None:
    """Print a plain aligned table (nothing when there are no rows, but the header)."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def when(value: Any) -> str:
    """Short display of an optional datetime."""
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")
