"""`vmshield image erase`: deep erase of a LUKS image or block device, without a keystore.

The logic is `nbd_plugin.erase`; this module is the click layer, plus the pieces
`vmshield disk destroy` (keystore/cli/destroy.py) shares: method choice, reporters, summary.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from nbd_plugin.erase import METHODS, Certificate, EraseOptions
from nbd_plugin.erase import erase as erase_image
from nbd_plugin.erase.progress import JsonLinesReporter, Reporter, RichReporter
from nbd_plugin.errors import ExitStatus, ImageBusy, VmshieldError

F = TypeVar("F", bound=Callable[..., Any])


def methods_help() -> str:
    """Two lines per method (passes, then source), for --help texts."""
    width = max(len(n) for n in METHODS)
    pad = " " * (width + 4)
    return "\n".join(
        f"  {m.name:<{width}}  {m.describe()}\n{pad}{m.source}" for m in METHODS.values()
    )


def method_option(f: F) -> F:
    """`--method M`, required, one of the erase methods."""
    return click.option(
        "--method",
        "-m",
        type=click.Choice(list(METHODS)),
        required=True,
        help="Erase method (see METHODS above).",
    )(f)


class EraseFailed(click.ClickException):
    """The erase did not complete; the message says what to do."""


class EraseBusy(EraseFailed):
    """The image is held by a server or another erase."""

    exit_code = ExitStatus.TEMPFAIL


class Interrupted(EraseFailed):
    """Ctrl-C: the journal keeps the position (exit status 130, as a shell reports SIGINT)."""

    exit_code = ExitStatus.INTERRUPTED


class VerifyFailed(EraseFailed):
    """The last pass did not read back as written."""

    exit_code = ExitStatus.IOERR


def run_erase(
    path: str, method: str, options: EraseOptions, as_json: bool, reporter: Reporter | None = None
) -> Certificate:
    """Run the erase with a progress bar (or JSON lines); errors become EraseFailed."""
    passes = len(METHODS[method].passes) if method in METHODS else 0
    rep = reporter or (
        JsonLinesReporter() if as_json else RichReporter(passes=passes, verify=options.verify)
    )
    try:
        cert = erase_image(path, method, options, rep)
    except ImageBusy as e:
        _json_error(as_json, str(e))
        raise EraseBusy(str(e)) from None
    except (VmshieldError, ValueError) as e:
        _json_error(as_json, str(e))
        raise EraseFailed(str(e)) from None
    except KeyboardInterrupt:
        msg = f"{path}: interrupted; run the same command again to continue where it stopped"
        _json_error(as_json, msg)
        raise Interrupted(msg) from None
    except OSError as e:
        msg = f"{path}: {e.strerror or e}; run the same command again to resume"
        _json_error(as_json, msg)
        raise EraseFailed(msg) from None
    if not cert.verified:
        v = cert.data["verification"]
        msg = (
            f"{path}: verification FAILED: {v['mismatched_bytes']} bytes read back differ "
            f"(first at byte {v['first_mismatch']}); the image was kept for inspection. "
            f"Certificate: {cert.path}"
        )
        _json_error(as_json, msg, certificate=cert.path, sha256=cert.sha256)
        raise VerifyFailed(msg)
    return cert


def _json_error(as_json: bool, message: str, **extra: Any) -> None:
    if as_json:
        click.echo(json.dumps({"event": "error", "message": message, **extra}, sort_keys=True))


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
    cert = run_erase(str(path), method, options, as_json)
    if as_json:
        done_event(cert)
    else:
        click.echo(summary(cert))
