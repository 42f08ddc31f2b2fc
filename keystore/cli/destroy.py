"""`vmshield disk destroy` and `vmshield job status`.

destroy checks the VM's erase permissions (thesis table 5-2) in the keystore, claims the
disk (state destroying, audited), runs the deep erase of nbd_plugin.erase and records the
outcome: state destroyed with the certificate's SHA-256 in the audit chain, or failed with the
reason. With --background the erase runs in a detached worker whose progress
`vmshield job status` shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from keystore.cli.erase import (
    EraseBusy,
    EraseFailed,
    confirm,
    done_event,
    method_option,
    methods_help,
    run_erase,
    summary,
)
from keystore.cli.options import (
    actor,
    db_option,
    emit_json,
    resolve_db,
    run,
    table,
)
from keystore.models import Disk, DiskState, ErasePermission
from keystore.repository import Repository
from keystore.services import jobs
from nbd_plugin.erase import Certificate, EraseOptions, get_method
from nbd_plugin.erase.journal import journal_path
from nbd_plugin.erase.progress import Reporter
from nbd_plugin.errors import ImageBusy
from nbd_plugin.osutil.locking import hold_image

CLAIMABLE = (DiskState.READY, DiskState.FAILED, DiskState.DESTROYING)
#: sysexits.h EX_NOPERM
EX_NOPERM = 77


class Denied(click.ClickException):
    """The VM's erase permissions forbid this method (exit status 77)."""

    exit_code = EX_NOPERM


def required_permission(method: str) -> str:
    """Which permission of table 5-2 a method needs.

    Overwriting methods are a deep erase. `crypto` only wipes the keyslots and removes the
    file, leaving the (undecryptable) ciphertext on the storage: a normal delete.
    """
    return "deep_erase" if get_method(method).overwrites else "normal_delete"


def check_permission(perm: ErasePermission, method: str) -> str | None:
    """None if allowed, else the reason (with the command that would allow it)."""
    need = required_permission(method)
    if getattr(perm, need):
        return None
    if need == "deep_erase":
        return (
            f"VM {perm.vm!r} does not allow deep erase of its disks (method {method}); "
            f"allow it with `vmshield perm set {perm.vm} --deep-erase yes`"
            + (", or use --method crypto (normal delete is allowed)" if perm.normal_delete else "")
        )
    return (
        f"VM {perm.vm!r} does not allow a normal delete (--method crypto leaves the "
        f"ciphertext on the storage); use an overwriting method such as dod3, or allow it "
        f"with `vmshield perm set {perm.vm} --normal-delete yes`"
    )


async def _claim(repo: Repository, name: str, method: str, who: str) -> Disk:
    disk = await repo.get_disk(name)
    perm = await repo.get_erase_permission(disk.vm)
    reason = check_permission(perm, method)
    if reason is not None:
        await repo.append_audit(
            who, "disk.destroy.denied", disk.vm, {"disk": name, "method": method, "why": reason}
        )
        raise Denied(reason)
    if disk.state not in CLAIMABLE:
        raise click.ClickException(
            f"disk {name!r} is {disk.state.value}: only ready, failed or interrupted "
            "(destroying) disks can be destroyed"
        )
    return disk


def _check_not_served(disk: Disk) -> None:
    """Refuse before claiming the disk if a server holds the image (cheap, race-tolerant:
    the erase itself takes the lock again)."""
    try:
        fd = os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.exists(journal_path(disk.path, block_device=False)):
            return  # unlinked by an interrupted destroy: the erase journal finishes it
        raise click.ClickException(
            f"disk {disk.name!r}: its image {disk.path} is missing; "
            f"`vmshield disk forget {disk.name}` removes the record"
        ) from None
    try:
        hold_image(fd, disk.path, exclusive=True)
    except ImageBusy:
        raise EraseBusy(
            f"disk {disk.name!r} is being served (or erased): "
            f"`vmshield disk stop {disk.name}` first, then run destroy again"
        ) from None
    finally:
        os.close(fd)


def execute(
    db: Path | None,
    disk: Disk,
    method: str,
    options: EraseOptions,
    as_json: bool,
    reporter: Reporter | None = None,
) -> Certificate:
    """Claim, erase, record. The disk ends destroyed, failed, or back to its state if busy
    (a concurrent destroy keeps its `destroying`)."""
    _check_not_served(disk)
    who = actor()
    before = disk.state
    run(
        db,
        lambda r: r.set_disk_state(
            disk.name,
            DiskState.DESTROYING,
            actor=who,
            expect=CLAIMABLE,
            detail={"method": method, "action": "destroy"},
        ),
    )
    try:
        cert = run_erase(disk.path, method, options, as_json, reporter)
    except EraseBusy as e:
        why = str(e)
        run(db, lambda r: r.set_disk_state(disk.name, before, actor=who, detail={"why": why}))
        raise
    except (EraseFailed, OSError, click.Abort) as e:
        why = str(e)
        run(
            db,
            lambda r: r.set_disk_state(
                disk.name,
                DiskState.FAILED,
                actor=who,
                detail={"why": why, "resume": f"vmshield disk destroy {disk.name} -m {method}"},
            ),
        )
        raise
    nist = cert.data["nist_sp800_88_rev2"]["category"]
    run(
        db,
        lambda r: r.set_disk_state(
            disk.name,
            DiskState.DESTROYED,
            actor=who,
            detail={
                "method": method,
                "certificate": cert.path,
                "certificate_sha256": cert.sha256,
                "verification": cert.data["verification"]["result"],
                "nist_sp800_88_rev2": nist,
            },
        ),
    )
    return cert


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
run again with the same method. A served disk is refused: `vmshield disk stop` first.

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
@db_option
def destroy(
    disk_name: str,
    method: str,
    background: bool,
    verify: bool,
    as_json: bool,
    yes: bool,
    db: Path | None,
) -> None:
    disk = run(db, lambda r: _claim(r, disk_name, method, actor()))
    _check_not_served(disk)  # before asking; execute() checks again
    confirm(f"disk {disk.name} ({disk.path})", yes)
    options = EraseOptions(verify=verify)
    if background:
        job = _spawn(db, disk, method, verify)
        if as_json:
            emit_json(job)
        else:
            click.echo(f"job {job['id']} started: vmshield job status {job['id']}")
        return
    cert = execute(db, disk, method, options, as_json)
    if as_json:
        done_event(cert, disk=disk.name)
    else:
        click.echo(summary(cert))


def _spawn(db: Path | None, disk: Disk, method: str, verify: bool) -> dict[str, Any]:
    dbpath = resolve_db(db)
    job_id = jobs.new_id("destroy")
    path = jobs.jobs_dir(dbpath) / f"{job_id}.json"
    log = path.with_suffix(".log")
    job: dict[str, Any] = {
        "id": job_id,
        "kind": "destroy",
        "disk": disk.name,
        "vm": disk.vm,
        "path": disk.path,
        "method": method,
        "verify": verify,
        "state": jobs.RUNNING,
        "pid": None,
        "started": time.time(),
        "log": str(log),
    }
    jobs.write(path, job)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(dbpath), str(path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    job["pid"] = proc.pid
    jobs.write(path, job)  # the worker rewrites it, with the same pid, as it progresses
    return job


WORKER = "import sys; from keystore.cli.destroy import main_worker; sys.exit(main_worker())"


def main_worker() -> int:
    """Entry of the detached worker: argv is [db, job file]."""
    return worker(Path(sys.argv[1]), Path(sys.argv[2]))


def worker(db: Path, job_path: Path) -> int:
    """The detached side of --background: run the destroy, keep the job file current."""
    job = jobs.read(job_path)
    job.update(pid=os.getpid(), state=jobs.RUNNING)
    jobs.write(job_path, job)
    rep = jobs.JobReporter(job_path, job)
    try:
        disk = run(db, lambda r: r.get_disk(job["disk"]))
        cert = execute(db, disk, job["method"], EraseOptions(verify=job["verify"]), False, rep)
    except (click.ClickException, click.Abort) as e:
        job.update(state=jobs.FAILED, error=str(e), finished=time.time())
        jobs.write(job_path, job)
        return 1
    job.update(
        state=jobs.DONE,
        finished=time.time(),
        certificate=cert.path,
        sha256=cert.sha256,
        nist_sp800_88_rev2=cert.data["nist_sp800_88_rev2"]["category"],
    )
    jobs.write(job_path, job)
    return 0


@click.group()
def job() -> None:
    """Follow background jobs (`vmshield disk destroy --background`)."""


def _progress(j: dict[str, Any]) -> str:
    total = j.get("total") or 0
    if j["state"] != jobs.RUNNING or not total:
        return "-"
    return f"{j.get('phase', '')} {100 * int(j.get('done', 0)) // total}%"


@job.command("status")
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@db_option
def status(job_id: str | None, as_json: bool, db: Path | None) -> None:
    """Show one job (JOB_ID), or every job of this keystore.

    States: running, done, failed, interrupted (the worker died: run the same
    `vmshield disk destroy` again to continue from the erase journal).
    """
    all_jobs = jobs.list_jobs(resolve_db(db))
    if job_id is not None:
        all_jobs = [j for j in all_jobs if j["id"] == job_id]
        if not all_jobs:
            raise click.ClickException(f"no job {job_id!r}; `vmshield job status` lists them")
    if as_json:
        emit_json(all_jobs[0] if job_id else all_jobs)
        return
    rows = [
        [
            j["id"],
            j["disk"],
            j["method"],
            j["state"],
            _progress(j),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["started"])),
        ]
        for j in all_jobs
    ]
    table(rows, ["id", "disk", "method", "state", "progress", "started"])
    if job_id is not None:
        j = all_jobs[0]
        for key in ("certificate", "sha256", "nist_sp800_88_rev2", "error", "log"):
            if j.get(key):
                click.echo(f"{key}: {j[key]}")
