"""The reusable pieces of every `vmshield` command: options, secrets, errors, output.

Options are decorators (`@db_option`, `@json_option`, `@kdf_options`, the secret-file
options) so each is written once and every command spells it the same way. Secrets are read
by one `SecretReader`: files byte for byte (as `cryptsetup --key-file` does), else one line
of stdin when it is not a terminal, else a hidden prompt. Errors are mapped once, by the
root group (keystore.cli).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

from keystore import paths
from keystore.audit import cli_actor
from keystore.cli import REPORTED, CliError, message
from keystore.location import Location
from keystore.repository import Repository
from keystore.secretpolicy import FORMAT_HELP, NEW_IMAGE_FORMAT, check_new_secret
from keystore.services.store import Keystore
from nbd_plugin import secrets
from nbd_plugin.errors import VerificationFailed

if TYPE_CHECKING:
    from nbd_plugin.erase import Certificate
    from nbd_plugin.erase.progress import Reporter

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: largest password / passphrase file accepted (the disk side's rule: nbd_plugin.secrets)
MAX_SECRET = secrets.MAX_KEY_FILE
#: the least PBKDF2 iterations a keyslot may get (a forced count below it is refused)
MIN_PBKDF2_ITERATIONS = 1000

__all__ = [
    "MAX_SECRET",
    "CliError",
    "SecretReader",
    "actor",
    "check_pbkdf2_iterations",
    "cipher_option",
    "config_option",
    "confirm",
    "db_option",
    "done_event",
    "emit_json",
    "format_option",
    "handle_errors",
    "json_errors",
    "json_option",
    "kdf_options",
    "method_option",
    "methods_help",
    "new_passphrase_file_option",
    "passphrase_file_option",
    "password_file_option",
    "resolve_db",
    "resolve_location",
    "run",
    "summary",
    "table",
    "when",
    "wipe",
]


# -- errors ------------------------------------------------------------------------------


def handle_errors(f: F) -> F:
    """Kept for commands that still carry it: the root (keystore.cli) maps every error."""
    return f


def run(
    db: Location | None, fn: Callable[[Repository], Awaitable[T]], *, blocking: bool = False
) -> T:
    """Open the keystore, await `fn(repo)`, close it (errors propagate to the root);
    `blocking`: without an event loop where the backend allows (Keystore.run)."""
    return Keystore(db).run(fn, blocking=blocking)


def actor() -> str:
    """Who runs this command, for the audit trail."""
    return cli_actor()


# -- options -----------------------------------------------------------------------------


class DbLocation(click.ParamType):  # type: ignore[type-arg]
    """`--db` values: a postgresql:// URL stays text (a Path would fold its `//`), else a path."""

    name = "PATH|URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Location):
            return value
        location = Location.parse(value)
        if location.file is None:
            return location
        return Location.parse(click.Path(dir_okay=False, path_type=Path).convert(value, param, ctx))


DB_HELP = (
    "Keystore database: an SQLite file (default: /var/lib/vmshield/keystore.db for "
    "root, ~/.local/share/vmshield/keystore.db otherwise), or a PostgreSQL URL shared by "
    "several hosts (postgresql://USER@HOST/DB; password in ~/.pgpass, never in the URL)."
)


def _group_db(ctx: click.Context, param: click.Parameter, value: Location | None) -> Any:
    """A command's `--db`: its own if given on the command line, else the one given to
    `vmshield --db ...` before the command (as `virsh -c`), else VMSHIELD_DB, else None."""
    root = ctx.find_root()
    text = root.params.get("db") if root is not ctx else None
    if text is None:
        return value
    given = DbLocation().convert(text, param, ctx)  # the root keeps it as text: no imports
    source = ctx.get_parameter_source(param.name or "db")
    if source in (ParameterSource.DEFAULT, ParameterSource.ENVIRONMENT):
        return given
    if value != given:
        raise click.UsageError(
            "--db given twice with different keystores; give it once (before or after the command)",
            ctx=ctx,
        )
    return value


def db_option(f: F) -> F:
    """`--db PATH|URL` (env VMSHIELD_DB): an SQLite file, or a postgresql:// URL; also taken
    from `vmshield --db ...` before the command."""
    return click.option(
        "--db",
        "db",
        type=DbLocation(),
        envvar=paths.DB_ENV,
        default=None,
        show_envvar=True,
        callback=_group_db,
        help=DB_HELP,
    )(f)


def config_option(f: F) -> F:
    """`--config FILE` (env VMSHIELD_HOOK_CONF): the qemu hook's hook.conf."""
    from keystore.services import hookconf

    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=hookconf.CONFIG_ENV,
        show_envvar=True,
        help=f"The hook's configuration file (default {hookconf.DEFAULT_CONFIG}).",
    )(f)


def resolve_db(db: Location | None) -> Path:
    """The keystore file, for commands that only work on a local SQLite keystore
    (NeedsLocalKeystore, a usage error, for a PostgreSQL URL)."""
    return Keystore(db).path


def resolve_location(db: Location | None) -> Location:
    """The keystore as given (file or PostgreSQL URL), or the default file."""
    return db if db is not None else Location.parse(paths.default_db_path())


def json_option(f: F) -> F:
    """`--json`: machine-readable output."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def _secret_file(name: str, help_text: str) -> Callable[[F], F]:
    return click.option(
        name,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help=help_text,
    )


def password_file_option(f: F) -> F:
    """`--password-file FILE`: a keystore user's password."""
    return _secret_file(
        "--password-file",
        "Read the password from FILE, byte for byte (no trailing newline: write it "
        "with printf '%s'), as cryptsetup --key-file does. Without it, a pipe on stdin "
        "gives one password per line; a terminal gets a hidden prompt.",
    )(f)


def passphrase_file_option(f: F) -> F:
    """`--passphrase-file FILE`: the (current) passphrase of a LUKS image."""
    return _secret_file(
        "--passphrase-file",
        "Read the (current) passphrase from FILE, byte for byte as cryptsetup --key-file "
        "does. Without it: a hidden prompt on a terminal, else one line of stdin.",
    )(f)


def new_passphrase_file_option(f: F) -> F:
    """`--new-passphrase-file FILE`."""
    return _secret_file(
        "--new-passphrase-file", "Read the new passphrase from FILE (byte for byte)."
    )(f)


def format_option(default: str = NEW_IMAGE_FORMAT) -> Callable[[F], F]:
    """`--format luks1|luks2` of a new image (the policy's default: luks2)."""
    from nbd_plugin.luks import FORMATS  # the LUKS library only for commands that write one

    return click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default=default,
        show_default=True,
        help=FORMAT_HELP,
    )


def cipher_option(f: F) -> F:
    """`--cipher SPEC` of a new image."""
    return click.option(
        "--cipher",
        default="aes-xts-plain64",
        show_default=True,
        help="Cipher spec (aes-xts-plain64; aes-cbc-essiv:sha256 for old tools).",
    )(f)


def kdf_options(f: F) -> F:
    """`--iter-time MS` and `--pbkdf-iterations N` for commands that write LUKS keyslots.

    They arrive as `iter_time_ms` and `iterations`; `check_pbkdf2_iterations` refuses a
    forced PBKDF2 count below MIN_PBKDF2_ITERATIONS (argon2 time costs may be small).
    """
    f = click.option(
        "--pbkdf-iterations",
        "iterations",
        type=click.IntRange(1, None),
        default=None,
        metavar="N",
        help="Fixed cost instead of --iter-time (tests and slow machines; weakens the "
        "keyslot): PBKDF2 iterations (a new image or disk: at least 1000); for LUKS2 it "
        "makes the keyslot PBKDF2 unless --pbkdf argon2* is given, where it is the argon2 "
        "time cost (as cryptsetup's --pbkdf-force-iterations).",
    )(f)
    return click.option(
        "--iter-time",
        "iter_time_ms",
        type=click.IntRange(1, 600_000),
        default=2000,
        show_default=True,
        metavar="MS",
        help="Milliseconds the key derivation of the new keyslot should take on this machine "
        "(as cryptsetup's --iter-time).",
    )(f)


def check_pbkdf2_iterations(iterations: int | None, pbkdf: str | None = None) -> None:
    """UsageError if a forced PBKDF2 iteration count is below the minimum."""
    if iterations is None or (pbkdf or "").startswith("argon2"):
        return
    if iterations < MIN_PBKDF2_ITERATIONS:
        raise click.UsageError(
            f"--pbkdf-iterations: PBKDF2 needs at least {MIN_PBKDF2_ITERATIONS} iterations"
        )


# -- secrets -----------------------------------------------------------------------------


_unlocked: str | None = None
"""Why this command's memory is not locked (keystore.cli.run), until a secret is read."""


def memory_not_locked(reason: str) -> None:
    """The command could not lock its memory (``reason``): ``warn_if_unlocked`` says so."""
    global _unlocked
    _unlocked = reason


def warn_if_unlocked() -> None:
    """Before a command reads or recovers a secret (SecretReader, the keyring, the host key,
    a clevis token): one line if its memory is not locked, once per command."""
    global _unlocked
    if _unlocked is not None:
        click.echo(
            f"vmshield: warning: memory not locked: {_unlocked}, so the secrets this command "
            "handles may be swapped out; locking needs CAP_IPC_LOCK (root) or an unlimited "
            "RLIMIT_MEMLOCK (LimitMEMLOCK=infinity)",
            err=True,
        )
        _unlocked = None


class SecretReader:
    """Reads passwords and passphrases; one per command, by nbd_plugin.secrets' rules.

    From a file: a key file, byte for byte (no newline stripping). Else, when stdin is not
    a terminal: one line each (so "current, then new" comes from two lines of a pipe). Else
    a hidden prompt, a line too. Every secret comes back as a bytearray: `wipe` it when
    done.
    """

    def __init__(self, default_file: Path | None = None, *, noun: str = "password") -> None:
        self.default_file = default_file
        self.noun = noun

    def read(self, prompt: str, *, confirm: bool = False, file: Path | None = None) -> bytearray:
        """One secret; `file` (else the reader's default file) wins over stdin."""
        warn_if_unlocked()
        file = file or self.default_file
        if file is not None:
            return secrets.read_key_file(str(file), f"{self.noun} file {file}")
        if not sys.stdin.isatty():
            return secrets.read_line(sys.stdin.buffer, f"{prompt}: the {self.noun} on stdin")
        text = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
        return secrets.from_line(bytearray(str(text).encode()), f"the {self.noun}")

    def read_new(self, prompt: str, *, file: Path | None = None) -> bytearray:
        """A new password or passphrase: confirmed when prompted, checked by the one policy
        (keystore.secretpolicy)."""
        pw = self.read(prompt, confirm=True, file=file)
        try:
            check_new_secret(bytes(pw), self.noun)
        except ValueError as e:
            hint = ""
            if (file or self.default_file) and pw.endswith(b"\n"):
                hint = " (the file ends with a newline: write it with printf '%s')"
            wipe(pw)
            raise click.ClickException(f"{e}{hint}") from e
        return pw


#: overwrite a secret buffer (nbd_plugin.secrets.wipe)
wipe = secrets.wipe


# -- erase -------------------------------------------------------------------------------
# `vmshield image erase` and `vmshield disk destroy`: the method option, the confirmation,
# the outcome (nbd_plugin.erase is imported by the commands that use these, not here)


def methods_help() -> str:
    """Two lines per method (passes, then source), for --help texts."""
    from nbd_plugin.erase import METHODS

    width = max(len(n) for n in METHODS)
    pad = " " * (width + 4)
    return "\n".join(
        f"  {m.name:<{width}}  {m.describe()}\n{pad}{m.source}" for m in METHODS.values()
    )


def method_option(f: F) -> F:
    """`--method M`, required, one of the erase methods."""
    from nbd_plugin.erase import METHODS

    return click.option(
        "--method",
        "-m",
        type=click.Choice(list(METHODS)),
        required=True,
        help="Erase method (see METHODS above).",
    )(f)


def summary(cert: Certificate) -> str:
    """A few human lines about a finished erase."""
    d = cert.data
    nist = d["nist_sp800_88_rev2"]
    lines = [
        f"erased {d['target']['path']} with {d['method']['name']}: "
        f"{len(d['passes'])} overwrite pass(es) of {d['target']['allocated_bytes']} "
        f"allocated bytes, {d['bytes_overwritten']} bytes written in {d['duration_seconds']} s",
        f"crypto-erase: {'done' if d['crypto_erase'].get('performed') else 'not applicable'}; "
        f"verification: {d['verification']['result']}; "
        f"discard: {d['discard'].get('result', 'skipped')}; "
        f"{'unlinked' if d['unlinked'] else 'kept'}",
        f"NIST SP 800-88 Rev. 2: {nist['category']}",
    ]
    unlink = d.get("unlink") or {}
    if unlink.get("reason"):
        lines.append(f"  note: {unlink['reason']}")
    if unlink.get("other_links"):
        lines.append(f"  note: {unlink['other_links']} other hard link(s) still name the file")
    lines += [f"  note: {n}" for n in d["storage"]["notes"]]
    lines += [f"  caveat: {c}" for c in nist["caveats"]]
    lines.append(f"certificate: {cert.path} (sha256 {cert.sha256})")
    return "\n".join(lines)


def erase_reporter(as_json: bool, method: str, verify: bool) -> Reporter:
    """How an erase shows its progress: JSON lines, or a bar per pass beside one for the
    whole erase (every pass and the read-back), so the ETA is the whole job's."""
    from nbd_plugin.erase import METHODS
    from nbd_plugin.erase.progress import JsonLinesReporter, RichReporter

    if as_json:
        return JsonLinesReporter()
    passes = len(METHODS[method].passes) if method in METHODS else 0
    return RichReporter(passes=passes, verify=verify)


def done_event(cert: Certificate, **extra: Any) -> None:
    """The final JSON line of --json."""
    click.echo(
        json.dumps(
            {
                "event": "done",
                "certificate": cert.path,
                "sha256": cert.sha256,
                "result": cert.data,
                **extra,
            },
            sort_keys=True,
        )
    )


def confirm(what: str, yes: bool) -> None:
    """Ask on a terminal; without one, demand --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"refusing to erase {what} without --yes (stdin is not a terminal)")
    click.confirm(f"Erase {what} irrecoverably?", abort=True, err=True)


@contextlib.contextmanager
def json_errors(as_json: bool) -> Iterator[None]:
    """With --json, an error also ends the JSON lines: {"event": "error", "message": ...}
    (with the certificate of a failed verification); the root still reports it."""
    try:
        yield
    except REPORTED as e:
        if as_json:
            extra = {}
            if isinstance(e, VerificationFailed):
                extra = {"certificate": e.certificate, "sha256": e.sha256}
            click.echo(json.dumps({"event": "error", "message": message(e), **extra},
                                  sort_keys=True))  # fmt: skip
        raise


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
