"""`vmshield image ...`: LUKS images without a keystore (create, inspect, keyslots)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from keystore.cli.secrets import SecretReader, secret_file_option
from keystore.services.disks import parse_size
from nbd_plugin import luks
from nbd_plugin.errors import ImageBusy, InvalidPassphrase, VmshieldError

F = TypeVar("F", bound=Callable[..., Any])


def PASSPHRASE_FILE(f: F) -> F:
    option: Callable[[F], F] = secret_file_option(
        "--passphrase-file",
        "Read the (current) passphrase from FILE, byte for byte as cryptsetup --key-file "
        "does. Without it: a hidden prompt on a terminal, else one line of stdin.",
    )
    return option(f)


def NEW_PASSPHRASE_FILE(f: F) -> F:
    option: Callable[[F], F] = secret_file_option(
        "--new-passphrase-file", "Read the new passphrase from FILE (byte for byte)."
    )
    return option(f)


def _kdf_options(f: F) -> F:
    f = click.option(
        "--iter-time",
        "iter_time_ms",
        type=click.IntRange(1, 600_000),
        default=2000,
        show_default=True,
        help="Milliseconds the key derivation should take on this machine.",
    )(f)
    f = click.option(
        "--pbkdf-iterations",
        "iterations",
        type=click.IntRange(1, None),
        default=None,
        help="Fixed cost instead of --iter-time (tests and benchmarks): PBKDF2 iterations; "
        "for LUKS2 it makes the keyslot PBKDF2 unless --pbkdf argon2* is given, where it is "
        "the argon2 time cost (as cryptsetup's --pbkdf-force-iterations).",
    )(f)
    return f


def _fail(exc: Exception) -> click.ClickException:
    if isinstance(exc, InvalidPassphrase):
        return click.ClickException(f"{exc}. Nothing was changed.")
    if isinstance(exc, ImageBusy):
        return click.ClickException(str(exc))
    return click.ClickException(str(exc))


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (VmshieldError, ValueError) as exc:
        raise _fail(exc) from None
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror}") from None


@click.group()
def image() -> None:
    """Work on LUKS image files directly: create, info, keyslots, erase.

    These commands need no keystore: they are what `vmshield disk ...` uses underneath,
    and they interoperate with cryptsetup, qemu-img and nbdkit's luks filter.
    """


@image.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", required=True, help="Virtual disk size: 10G, 512M, 1T or bytes.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(luks.FORMATS),
    default="luks1",
    show_default=True,
    help="luks1 opens in QEMU and nbdkit's luks filter too; luks2 has argon2id "
    "keyslots and 4096-byte sectors.",
)
@click.option(
    "--cipher",
    default="aes-xts-plain64",
    show_default=True,
    help="Cipher spec (aes-xts-plain64; aes-cbc-essiv:sha256 for old tools).",
)
@click.option(
    "--key-size",
    type=click.Choice(["256", "512"]),
    default="512",
    show_default=True,
    help="Master key bits (XTS: 512 = AES-256).",
)
@click.option(
    "--hash",
    "hash_name",
    default="sha256",
    show_default=True,
    help="PBKDF2 hash: sha1, sha256 or sha512.",
)
@click.option(
    "--sector-size",
    type=click.Choice(["512", "4096"]),
    default=None,
    help="LUKS2 only: encryption sector size (default 4096).",
)
@click.option(
    "--pbkdf",
    type=click.Choice(["argon2id", "argon2i", "pbkdf2"]),
    default=None,
    help="LUKS2 only: keyslot KDF (default argon2id).",
)
@click.option(
    "--pbkdf-memory",
    type=click.IntRange(32, 4 * 1024 * 1024),
    default=None,
    metavar="KIB",
    help="LUKS2 only: argon2 memory cost in KiB (default: calibrated, at most 1 GiB).",
)
@click.option(
    "--pbkdf-parallel",
    type=click.IntRange(1, 4),
    default=None,
    help="LUKS2 only: argon2 threads (default: up to 4 CPUs).",
)
@_kdf_options
@PASSPHRASE_FILE
@click.option("--json", "as_json", is_flag=True, help="Print the new image's info as JSON.")
def create(
    path: Path,
    size: str,
    fmt: str,
    cipher: str,
    key_size: str,
    hash_name: str,
    sector_size: str | None,
    pbkdf: str | None,
    pbkdf_memory: int | None,
    pbkdf_parallel: int | None,
    iterations: int | None,
    iter_time_ms: int,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Create a new encrypted image at PATH (never overwrites an existing file).

    \b
    Example:
      vmshield image create /var/lib/vmshield/disks/web.img --size 20G \\
          --passphrase-file /run/keys/web.key
    """
    size_bytes = _guard(lambda: parse_size(size))
    opts: dict[str, Any] = {}
    if fmt == "luks2":
        if sector_size:
            opts["sector_size"] = int(sector_size)
        if pbkdf:
            opts["pbkdf"] = pbkdf
        if pbkdf_memory:
            opts["pbkdf_memory"] = pbkdf_memory
        if pbkdf_parallel:
            opts["pbkdf_parallel"] = pbkdf_parallel
    elif sector_size or pbkdf or pbkdf_memory or pbkdf_parallel:
        raise click.UsageError("--sector-size and --pbkdf* apply to --format luks2 only")
    if iterations is not None and iterations < 1000 and not (pbkdf or "").startswith("argon2"):
        raise click.UsageError("--pbkdf-iterations: PBKDF2 needs at least 1000 iterations")
    secret = SecretReader().read(passphrase_file, "New passphrase", confirm=True)
    _guard(
        lambda: luks.create_image(
            str(path),
            size_bytes,
            secret,
            fmt=fmt,
            cipher=cipher,
            key_bytes=int(key_size) // 8,
            hash=hash_name,
            iterations=iterations,
            iter_time_ms=iter_time_ms,
            **opts,
        )
    )
    if as_json:
        click.echo(json.dumps(_guard(lambda: luks.info(str(path))), indent=2))
    else:
        click.echo(f"created {path}: {fmt}, {cipher}, {size_bytes} bytes")


def _print_info(meta: dict[str, Any]) -> None:
    for key in (
        "path",
        "format",
        "uuid",
        "cipher",
        "key_bits",
        "hash",
        "sector_size",
        "payload_offset",
        "size",
    ):
        if key in meta:
            click.echo(f"{key + ':':16}{meta[key]}")
    for slot in meta.get("keyslots", []):
        state = "ENABLED" if slot.get("active") else "DISABLED"
        extra = ""
        if slot.get("active"):
            kdf = slot.get("kdf", "pbkdf2")
            if kdf.startswith("argon2"):
                extra = (f"  {kdf}, time {slot.get('time')}, memory {slot.get('memory_kib')} KiB,"
                         f" {slot.get('parallel')} threads")  # fmt: skip
            else:
                extra = f"  {kdf}, {slot.get('iterations')} iterations"
        click.echo(f"keyslot {slot['slot']}:      {state}{extra}")
    for warning in meta.get("warnings", []):
        click.echo(f"warning:        {warning}")


@image.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path: Path, as_json: bool) -> None:
    """Show what the header of PATH says (no passphrase needed)."""
    meta = _guard(lambda: luks.info(str(path)))
    if as_json:
        click.echo(json.dumps(meta, indent=2))
    else:
        _print_info(meta)


@image.command("add-key")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@PASSPHRASE_FILE
@NEW_PASSPHRASE_FILE
@click.option(
    "--slot",
    type=click.IntRange(0, 31),
    default=None,
    help="Keyslot to use (default: the first free one).",
)
@_kdf_options
def add_key(
    path: Path,
    passphrase_file: Path | None,
    new_passphrase_file: Path | None,
    slot: int | None,
    iterations: int | None,
    iter_time_ms: int,
) -> None:
    """Add a passphrase to PATH, authorised by an existing one."""
    reader = SecretReader()
    old = reader.read(passphrase_file, "Existing passphrase")
    new = reader.read(new_passphrase_file, "New passphrase", confirm=True)
    index = _guard(
        lambda: luks.add_key(
            str(path), old, new, slot=slot, iterations=iterations, iter_time_ms=iter_time_ms
        )
    )
    click.echo(f"added keyslot {index}")


@image.command("remove-key")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@PASSPHRASE_FILE
@click.option(
    "--force-last",
    is_flag=True,
    help="Allow removing the last keyslot (the data becomes unrecoverable).",
)
def remove_key(path: Path, passphrase_file: Path | None, force_last: bool) -> None:
    """Remove the keyslot that the given passphrase opens (its key material is wiped)."""
    secret = SecretReader().read(passphrase_file, "Passphrase to remove")
    index = _guard(lambda: luks.remove_key(str(path), secret, allow_last=force_last))
    click.echo(f"removed keyslot {index}")


@image.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@PASSPHRASE_FILE
@NEW_PASSPHRASE_FILE
@_kdf_options
def passwd(
    path: Path,
    passphrase_file: Path | None,
    new_passphrase_file: Path | None,
    iterations: int | None,
    iter_time_ms: int,
) -> None:
    """Change a passphrase: the new keyslot is written before the old one is wiped."""
    reader = SecretReader()
    old = reader.read(passphrase_file, "Current passphrase")
    new = reader.read(new_passphrase_file, "New passphrase", confirm=True)
    index = _guard(
        lambda: luks.change_key(
            str(path), old, new, iterations=iterations, iter_time_ms=iter_time_ms
        )
    )
    click.echo(f"passphrase changed (keyslot {index})")


@image.command("test-passphrase")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@PASSPHRASE_FILE
def test_passphrase(path: Path, passphrase_file: Path | None) -> None:
    """Check that a passphrase opens PATH (exit 0) without serving it."""
    secret = SecretReader().read(passphrase_file, "Passphrase")

    def check() -> int:
        volume = luks.open_volume(str(path), secret, readonly=True)
        try:
            return volume.keyslot
        finally:
            volume.close()

    click.echo(f"keyslot {_guard(check)} opens {path}")


# `image erase` lives in keystore/cli/erase.py (erase developer).
from keystore.cli.erase import erase  # noqa: E402

image.add_command(erase)
