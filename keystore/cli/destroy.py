"""`vmshield disk destroy`: the click layer over keystore.services.destroy."""

from __future__ import annotations

import click

from keystore.cli import abandoned
from keystore.cli.erase import confirm, done_event, method_option, methods_help, run_erase, summary
from keystore.cli.options import actor, db_option, emit_json, handle_errors, resolve_db, run
from keystore.location import Location
from keystore.services import destroy as destroying
from keystore.services import hookconf
from keystore.services.store import Keystore
from nbd_plugin.erase import Certificate, EraseOptions

DESTROY_HELP = f"""Destroy the image of DISK and keep the record as destroyed.

\b
Checks the VM's erase permissions (vmshield perm show VM, thesis table 5-2):
  deep erase     needed by every overwriting method;
  normal delete  needed by --method crypto (keyslots wiped, file removed, the
                 undecryptable ciphertext is not overwritten).
A refusal is recorded in the audit trail. Then, as `vmshield image erase` does:
crypto-erase, overwrite passes, verification, discard, unlink, certificate. The
certificate's SHA-256 goes into the audit chain with the disk's new state.

\b
METHODS
{methods_help()}

\b
--background returns at once with a job id; `vmshield job status ID` follows it.
An interrupted destroy (state destroying or failed) continues where it stopped when
run again with the same method. A served disk is refused (the server is named):
`vmshield disk stop` first. So is a disk whose libvirt domain, started through the
qemu hook, still runs (--force erases anyway).

\b
Exit status: 0 destroyed (or job started); 1 error; 74 verification failed;
75 the image is in use; 77 the VM's permissions forbid this method.
"""


@click.command("destroy", help=DESTROY_HELP)
@click.argument("disk_name", metavar="DISK")
@method_option
@click.option("--background", is_flag=True, help="Run in a detached job; print its id.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Read the last pass back and compare.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines (progress, result) on stdout.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Erase even while the libvirt domain the qemu hook served DISK for still runs.",
)
@db_option
@handle_errors
def destroy(
    disk_name: str,
    method: str,
    background: bool,
    verify: bool,
    as_json: bool,
    yes: bool,
    force: bool,
    db: Location | None,
) -> None:
    store = Keystore(db)
    abandoned.reap(db)
    disk = run(db, lambda r: destroying.claim(r, disk_name, method, actor()))
    destroying.check_not_served(disk)  # before asking; execute() checks again
    if not force:
        destroying.check_idle(disk, hookconf.run_dirs())
    confirm(f"disk {disk.name} ({disk.path})", yes)
    if background:
        job = destroying.spawn(Keystore(resolve_db(db)), disk, method, verify)
        if as_json:
            emit_json(job)
        else:
            click.echo(f"job {job['id']} started: vmshield job status {job['id']}")
        return

    def erase(path: str, method: str, options: EraseOptions) -> Certificate:
        return run_erase(path, method, options, as_json)

    cert = destroying.execute(
        store, disk, method, EraseOptions(verify=verify), erase=erase, who=actor()
    )
    if as_json:
        done_event(cert, disk=disk.name)
    else:
        click.echo(summary(cert))
