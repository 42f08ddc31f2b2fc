"""Destroying a recorded disk: permission policy, claim, erase, record (thesis table 5-2).

`claim` checks the VM's erase permissions (a refusal is audited) and the disk's state;
`execute` marks the disk `destroying`, runs the deep erase of `nbd_plugin.erase` and records
the outcome: `destroyed` with the certificate's SHA-256 in the audit chain, `failed` with the
reason, or the state it had if the image turned out to be busy. `spawn` runs the same in a
detached worker (`python -m keystore.services.destroy DB JOBFILE`) whose progress the job
file shows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from keystore.audit import cli_actor
from keystore.errors import Conflict, InUse, NotFound, PermissionDenied
from keystore.models import Disk, DiskState, ErasePermission
from keystore.repository import Repository
from keystore.services import disks, erasing, jobs, serve
from keystore.services.store import Keystore
from nbd_plugin.erase import Certificate, EraseOptions, get_method
from nbd_plugin.erase.journal import journal_path
from nbd_plugin.erase.progress import Reporter
from nbd_plugin.errors import ExitStatus, ImageBusy, VmshieldError
from nbd_plugin.osutil.locking import hold_image

CLAIMABLE = (DiskState.READY, DiskState.FAILED, DiskState.DESTROYING)

#: erase(path, method, options) -> the certificate; raises on failure
Eraser = Callable[[str, str, EraseOptions], Certificate]


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


async def claim(repo: Repository, name: str, method: str, who: str) -> Disk:
    """The disk `name`, if its VM's permissions allow `method` and its state allows a destroy.

    A refusal by the permissions is audited (`disk.destroy.denied`) and raises
    PermissionDenied; a disk in another state raises Conflict. Nothing else is changed.
    """
    disk = await repo.get_disk(name)
    perm = await repo.get_erase_permission(disk.vm)
    reason = check_permission(perm, method)
    if reason is not None:
        await repo.append_audit(
            who, "disk.destroy.denied", disk.vm, {"disk": name, "method": method, "why": reason}
        )
        raise PermissionDenied(reason)
    if disk.state not in CLAIMABLE:
        raise Conflict(
            f"disk {name!r} is {disk.state.value}: only ready, failed or interrupted "
            "(destroying) disks can be destroyed"
        )
    return disk


def check_not_served(disk: Disk) -> None:
    """Refuse (InUse) if a server holds the image; NotFound if the image is gone;
    NotTheRecordedImage if the file at the path is not the recorded image.

    Cheap and race-tolerant: the erase itself takes the lock again.
    """
    resuming = os.path.exists(journal_path(disk.path, block_device=False))
    try:
        fd = os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if resuming:
            return  # unlinked by an interrupted destroy: the erase journal finishes it
        raise NotFound(
            f"disk {disk.name!r}: its image {disk.path} is missing; "
            f"`vmshield disk forget {disk.name}` removes the record"
        ) from None
    try:
        disks.check_identity(disk, resuming=resuming)
        hold_image(fd, disk.path, exclusive=True)
    except ImageBusy:
        held = serve.held_by(disk)
        raise InUse(
            f"disk {disk.name!r} is being served (or erased)"
            + (f": its image is {held}" if held else "")
            + f"; `vmshield disk stop {disk.name}` (or stop that process) first, "
            "then run destroy again"
        ) from None
    finally:
        os.close(fd)


def check_idle(disk: Disk, run_dirs: Sequence[Path]) -> None:
    """Refuse (InUse) while the libvirt domain the qemu hook served `disk` for still runs
    (its QEMU would be writing to a disk being erased); `--force` skips this check."""
    serve.refuse_in_use(disk, f"vmshield disk destroy {disk.name}",
                        serve.users(disk, None, run_dirs))  # fmt: skip


def eraser(reporter: Reporter | None = None) -> Eraser:
    """The eraser `execute` takes: `erasing.run_erase`, a busy image as InUse."""

    def run(path: str, method: str, options: EraseOptions) -> Certificate:
        try:
            return erasing.run_erase(path, method, options, reporter)
        except ImageBusy as e:
            raise InUse(str(e)) from None

    return run


def _nothing_done(exc: BaseException) -> bool:
    """The erase refused before touching the image (busy): the disk keeps its state."""
    return isinstance(exc, ImageBusy | InUse) or (
        getattr(exc, "exit_code", None) == ExitStatus.TEMPFAIL
    )


def execute(
    store: Keystore,
    disk: Disk,
    method: str,
    options: EraseOptions,
    *,
    erase: Eraser,
    who: str,
) -> Certificate:
    """Claim, erase, record. The disk ends destroyed, failed, or back to its state if busy
    (a concurrent destroy keeps its `destroying`). The erase's own error propagates."""
    check_not_served(disk)
    before = disk.state
    store.run(
        lambda r: r.set_disk_state(
            disk.name,
            DiskState.DESTROYING,
            actor=who,
            expect=CLAIMABLE,
            detail={"method": method, "action": "destroy"},
        )
    )
    try:
        cert = erase(disk.path, method, options)
    except BaseException as e:
        why = str(e)
        if _nothing_done(e):
            state, detail = before, {"why": why}
        else:
            resume = f"vmshield disk destroy {disk.name} -m {method}"
            state, detail = DiskState.FAILED, {"why": why, "resume": resume}
        store.run(lambda r: r.set_disk_state(disk.name, state, actor=who, detail=detail))
        raise
    store.run(
        lambda r: r.set_disk_state(
            disk.name,
            DiskState.DESTROYED,
            actor=who,
            detail={
                "method": method,
                "certificate": cert.path,
                "certificate_sha256": cert.sha256,
                "verification": cert.data["verification"]["result"],
                "nist_sp800_88_rev2": cert.data["nist_sp800_88_rev2"]["category"],
            },
        )
    )
    return cert


# -- in the background -------------------------------------------------------------------


def spawn(store: Keystore, disk: Disk, method: str, verify: bool) -> dict[str, Any]:
    """Start a detached worker destroying `disk`; returns its job (see keystore.services.jobs)."""
    job_id = jobs.new_id("destroy")
    path = jobs.jobs_dir(store.path) / f"{job_id}.json"
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
    with os.fdopen(jobs.new_file(log), "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(store.path), str(path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    job["pid"] = proc.pid
    jobs.write(path, job)  # the worker rewrites it, with the same pid, as it progresses
    return job


class Cancelled(BaseException):
    """`vmshield job cancel` sent SIGTERM: stop where the erase is; its journal resumes it."""


def _cancel(signum: int, frame: object) -> None:
    raise Cancelled


def worker(db: Path, job_path: Path, who: str) -> int:
    """The detached side of `spawn`: run the destroy, keep the job file current. SIGTERM
    (`vmshield job cancel`) stops it; the disk is left failed, with how to resume."""
    signal.signal(signal.SIGTERM, _cancel)
    job = jobs.read(job_path)
    job.update(pid=os.getpid(), state=jobs.RUNNING)
    jobs.write(job_path, job)
    store = Keystore(db)
    options = EraseOptions(verify=job["verify"])
    try:
        disk = store.run(lambda r: r.get_disk(job["disk"]))
        passes = len(get_method(job["method"]).passes)
        run = eraser(jobs.JobReporter(job_path, job, passes=passes, verify=job["verify"]))
        cert = execute(store, disk, job["method"], options, erase=run, who=who)
    except Cancelled:
        resume = f"vmshield disk destroy {job['disk']} --method {job['method']}"
        job.update(state=jobs.CANCELLED, finished=time.time(), eta_seconds=None,
                   error=f"cancelled; `{resume}` continues it from the erase journal")  # fmt: skip
        jobs.write(job_path, job)
        return 1
    except (VmshieldError, ValueError) as e:
        job.update(state=jobs.FAILED, error=str(e), finished=time.time(), eta_seconds=None)
        jobs.write(job_path, job)
        return 1
    job.update(
        state=jobs.DONE,
        finished=time.time(),
        eta_seconds=0,
        certificate=cert.path,
        sha256=cert.sha256,
        nist_sp800_88_rev2=cert.data["nist_sp800_88_rev2"]["category"],
    )
    jobs.write(job_path, job)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m keystore.services.destroy DB JOBFILE`: the worker `spawn` starts."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m keystore.services.destroy DB JOBFILE", file=sys.stderr)
        return ExitStatus.USAGE
    return worker(Path(args[0]), Path(args[1]), cli_actor())


if __name__ == "__main__":
    sys.exit(main())
