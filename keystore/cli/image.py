"""`vmshield image ...`: LUKS images without a keystore (create, inspect, keyslots, erase)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from keystore.cli.options import (
    SecretReader,
    check_pbkdf2_iterations,
    cipher_option,
    confirm,
    done_event,
    erase_reporter,
    format_option,
    json_errors,
    kdf_options,
    method_option,
    methods_help,
    new_passphrase_file_option,
    passphrase_file_option,
    summary,
)
from keystore.services.disks import creation_error
from keystore.sizes import human, image_size
from nbd_plugin import luks
from nbd_plugin.crypto import jit
from nbd_plugin.crypto.registry import kernel_for
from nbd_plugin.erase import EraseOptions
from nbd_plugin.errors import InvalidPassphrase


def _guard(fn: Callable[[], Any]) -> Any:
    """Run `fn`; a wrong passphrase says that nothing was changed (the root reports errors)."""
    try:
        return fn()
    except InvalidPassphrase as exc:
        raise InvalidPassphrase(f"{exc}. Nothing was changed.") from None


def _reader() -> SecretReader:
    return SecretReader(noun="passphrase")


@click.group()
def image() -> None:
    """Work on LUKS image files directly: create, info, keyslots, erase.

    These commands need no keystore: they are what `vmshield disk ...` uses underneath,
    and they interoperate with cryptsetup, qemu-img and nbdkit's luks filter.
    """


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--size",
    required=True,
    help="Virtual disk size as qemu-img reads it: bytes, or with a suffix K, M, G, T, P, E "
    "(powers of 1024), e.g. 10G or 1.5G; rounded up to whole sectors.",
)
@format_option()
@cipher_option
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
@kdf_options
@passphrase_file_option
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
    check_pbkdf2_iterations(iterations, pbkdf)
    sector = 512 if fmt == "luks1" else int(sector_size or 4096)
    try:
        size_bytes, taken = image_size(size, sector)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--size") from e
    if not as_json:  # the JSON gives the size
        click.echo(f"size: {taken}", err=True)
    secret = _reader().read_new("New passphrase", file=passphrase_file)

    def make() -> None:
        try:
            luks.create_image(
                str(path),
                size_bytes,
                bytes(secret),
                fmt=fmt,
                cipher=cipher,
                key_bytes=int(key_size) // 8,
                hash=hash_name,
                iterations=iterations,
                iter_time_ms=iter_time_ms,
                **opts,
            )
        except OSError as e:  # the library removed its partial file
            raise click.ClickException(creation_error(path, size_bytes, e)) from None

    _guard(make)
    if as_json:
        click.echo(json.dumps(_guard(lambda: luks.info(str(path))), indent=2))
    else:
        click.echo(f"created {path}: {fmt}, {cipher}, {human(size_bytes)} = {size_bytes} bytes")


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
        "data_path",
        "kernel",
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


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path: Path, as_json: bool) -> None:
    """Show what the header of PATH says (no passphrase needed)."""
    meta = _guard(lambda: luks.info(str(path)))
    meta["data_path"] = jit.data_path()  # how this host's servers en/decrypt: numba or numpy
    name, _, mode = str(meta.get("cipher", "")).partition("-")
    meta["kernel"] = kernel_for(name, mode, int(meta.get("sector_size", 512)))
    if as_json:
        click.echo(json.dumps(meta, indent=2))
    else:
        _print_info(meta)


@click.command("add-key")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@passphrase_file_option
@new_passphrase_file_option
@click.option(
    "--slot",
    type=click.IntRange(0, 31),
    default=None,
    help="Keyslot to use (default: the first free one).",
)
@kdf_options
def add_key(
    path: Path,
    passphrase_file: Path | None,
    new_passphrase_file: Path | None,
    slot: int | None,
    iterations: int | None,
    iter_time_ms: int,
) -> None:
    """Add a passphrase to PATH, authorised by an existing one."""
    reader = _reader()
    old = reader.read("Existing passphrase", file=passphrase_file)
    new = reader.read_new("New passphrase", file=new_passphrase_file)
    index = _guard(
        lambda: luks.add_key(
            str(path),
            bytes(old),
            bytes(new),
            slot=slot,
            iterations=iterations,
            iter_time_ms=iter_time_ms,
        )
    )
    click.echo(f"added keyslot {index}")


@click.command("remove-key")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@passphrase_file_option
@click.option(
    "--force-last",
    is_flag=True,
    help="Allow removing the last keyslot (the data becomes unrecoverable).",
)
def remove_key(path: Path, passphrase_file: Path | None, force_last: bool) -> None:
    """Remove the keyslot that the given passphrase opens (its key material is wiped)."""
    secret = _reader().read("Passphrase to remove", file=passphrase_file)
    index = _guard(lambda: luks.remove_key(str(path), bytes(secret), allow_last=force_last))
    click.echo(f"removed keyslot {index}")


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@passphrase_file_option
@new_passphrase_file_option
@kdf_options
def passwd(
    path: Path,
    passphrase_file: Path | None,
    new_passphrase_file: Path | None,
    iterations: int | None,
    iter_time_ms: int,
) -> None:
    """Change a passphrase: the new keyslot is written before the old one is wiped."""
    reader = _reader()
    old = reader.read("Current passphrase", file=passphrase_file)
    new = reader.read_new("New passphrase", file=new_passphrase_file)
    index = _guard(
        lambda: luks.change_key(
            str(path), bytes(old), bytes(new), iterations=iterations, iter_time_ms=iter_time_ms
        )
    )
    click.echo(f"passphrase changed (keyslot {index})")


@click.command("test-passphrase")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@passphrase_file_option
def test_passphrase(path: Path, passphrase_file: Path | None) -> None:
    """Check that a passphrase opens PATH (exit 0) without serving it."""
    secret = bytes(_reader().read("Passphrase", file=passphrase_file))

    def check() -> int:
        volume = luks.open_volume(str(path), secret, readonly=True)
        try:
            return volume.keyslot
        finally:
            volume.close()

    click.echo(f"keyslot {_guard(check)} opens {path}")


ERASE_HELP = f"""Destroy the LUKS image (or block device) PATH for good.

\b
Order of work:
  1. refuse if a server (nbdkit) or another erase holds PATH's lock;
  2. crypto-erase: overwrite the LUKS header and every keyslot area three times with
     fdatasync - from here on the data cannot be decrypted by anyone;
  3. overwrite every allocated extent with each pass of the method (holes hold nothing
     and stay holes), fdatasync after each pass;
  4. read every byte of the last pass back (O_DIRECT) and compare (--no-verify skips);
  5. discard: punch a hole over the file / BLKDISCARD the device (--secure-discard:
     BLKSECDISCARD); 6. unlink the file (block devices stay). --keep skips 5 and 6.

\b
METHODS
{methods_help()}

Random passes are an AES-256-CTR keystream, reproducible from the key in the journal and
the certificate, so anyone can re-verify the final pass.

An interrupted erase (crash, kill, power loss) leaves a journal PATH.vmshield-erase (block
devices: /var/lib/vmshield/erase/); running the same command again continues where it
stopped. The certificate (JSON) goes to PATH.erase-certificate.json unless --certificate
says otherwise; it records what was done and an honest storage assessment: copy-on-write
filesystems, shared extents, thin provisioning and SSDs do not let an overwrite reach old
blocks, and only the crypto-erase is then a Purge in the sense of NIST SP 800-88 Rev. 2.

PATH must be a LUKS image (file or block device), named by itself: a symbolic link is
refused (only a link to a block device, such as /dev/disk/by-id/..., is resolved), and so
are a file that is not LUKS and a file with other hard links, unless --force. The name is
unlinked only if it still refers to the erased file when the erase ends.

\b
Examples:
  vmshield image erase /srv/vm/disk.img --method dod3
  vmshield image erase /dev/sdb --method zero --secure-discard --yes
  vmshield image erase /dev/sdc --method zero --force --yes   # not LUKS: a raw disk
  vmshield image erase old.img -m crypto --keep --json --yes

\b
Exit status: 0 erased; 1 error; 2 usage; 74 verification failed (image kept);
75 the image is in use (stop the server, then run again); 130 interrupted (run again).
"""


@click.command("erase", help=ERASE_HELP)
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@method_option
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Read the last pass back and compare.",
)
@click.option("--keep", is_flag=True, help="Leave the overwritten image: no discard, no unlink.")
@click.option("--no-discard", is_flag=True, help="Do not punch holes / discard before unlink.")
@click.option(
    "--secure-discard",
    is_flag=True,
    help="Block devices: BLKSECDISCARD instead of BLKDISCARD (fails if unsupported).",
)
@click.option(
    "--certificate",
    "certificate",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the certificate here instead of PATH.erase-certificate.json.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Also erase a target that is not a LUKS image, or a file with other hard links.",
)
@click.option("--json", "as_json", is_flag=True, help="Progress as JSON lines on stdout.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def erase(
    path: Path,
    method: str,
    verify: bool,
    keep: bool,
    no_discard: bool,
    secure_discard: bool,
    certificate: Path | None,
    force: bool,
    as_json: bool,
    yes: bool,
) -> None:
    confirm(str(path), yes)
    options = EraseOptions(
        verify=verify,
        discard=not (keep or no_discard),
        unlink=not keep,
        secure_discard=secure_discard,
        certificate_path=str(certificate) if certificate else None,
        force=force,
    )
    from keystore.services.erasing import run_erase

    with json_errors(as_json):
        cert = run_erase(str(path), method, options, erase_reporter(as_json, method, verify))
    if as_json:
        done_event(cert)
    else:
        click.echo(summary(cert))
