"""Background jobs of the CLI (so far: `disk destroy --background`), as small JSON files.

The keystore has no jobs table; a job is one file `<db dir>/jobs/<id>.json`, written
atomically by the worker process, read by `vmshield job status`. A job whose worker died
(crash, kill, reboot) shows as "interrupted": the erase journal lets the same
`vmshield disk destroy` command continue it.

The worker runs as root. The jobs directory must therefore be the caller's own and writable
by no one else (keystore.paths.private_dir: no symlink, no other owner, no group/other
write), and a job file is replaced through a fresh temporary name (O_CREAT|O_EXCL|O_NOFOLLOW:
never an existing file or a planted link) renamed over it: rename replaces a link, it does
not follow it (nbd_plugin.osutil.files). Job files are read by nbd_plugin.trust's rules
(never through a link), at most MAX_JOB_BYTES.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from keystore import paths
from keystore.errors import Conflict, KeystoreError, NotFound
from nbd_plugin import trust
from nbd_plugin.erase.progress import Reporter, whole_job_offset
from nbd_plugin.osutil.files import replace_file

RUNNING = "running"
DONE = "done"
FAILED = "failed"
INTERRUPTED = "interrupted"
CANCELLED = "cancelled"

#: a job file is a few hundred bytes; anything bigger was not written by us
MAX_JOB_BYTES = 1 << 16


class JobFileError(KeystoreError):
    """A job file is not a regular file of ours (a link, a device, too big, not JSON)."""


def jobs_dir(db: Path) -> Path:
    """Where the jobs of keystore `db` live."""
    return db.parent / "jobs"


def new_id(kind: str) -> str:
    """A short unique job id."""
    return f"{kind}-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"


def private_jobs_dir(path: Path) -> Path:
    """The directory of job file `path`, made 0700 if missing; refused if others control it."""
    return paths.private_dir(path.parent)


def new_file(path: Path) -> int:
    """A descriptor of `path` created now (0600) in the checked jobs dir: never a link."""
    private_jobs_dir(path)
    return os.open(path, paths.NEW_FILE, 0o600)


def write(path: Path, job: dict[str, Any]) -> None:
    """Replace the job file atomically, never writing through a link."""
    private_jobs_dir(path)
    replace_file(str(path), json.dumps(job, sort_keys=True).encode(), 0o600)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) is not running
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read(path: Path) -> dict[str, Any]:
    """A job, with state "interrupted" if it claims to run but its process is gone."""
    try:
        blob = trust.read_file(path, "job file", MAX_JOB_BYTES)
    except trust.Untrusted as e:
        raise JobFileError(str(e)) from None
    try:
        job: dict[str, Any] = json.loads(blob)
    except ValueError:
        raise JobFileError(f"job file {path} is not a vmshield job (not JSON)") from None
    if not isinstance(job, dict):
        raise JobFileError(f"job file {path} is not a vmshield job")
    if job.get("state") == RUNNING and not _alive(int(job.get("pid") or 0)):
        job["state"] = INTERRUPTED
    return job


def list_jobs(db: Path) -> list[dict[str, Any]]:
    """Every job of this keystore, oldest first."""
    d = jobs_dir(db)
    if not d.is_dir():
        return []
    return sorted((read(p) for p in d.glob("*.json")), key=lambda j: str(j.get("started")))


def iso(epoch: float | None) -> str | None:
    """An epoch time as ISO 8601 UTC (2026-12-07T01:45:00Z)."""
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class JobReporter(Reporter):
    """Erase progress into the job file, at most every `interval` seconds.

    Besides the current phase, the whole job's bytes (`overall_done` of `overall_total`:
    every overwrite pass, then the read-back) and `eta_seconds` for all that remains, at
    the current phase's rate. `passes` and `verify` say how much there is to do."""

    def __init__(
        self,
        path: Path,
        job: dict[str, Any],
        interval: float = 0.5,
        *,
        passes: int = 0,
        verify: bool = False,
    ) -> None:
        self.path, self.job, self.interval = path, job, interval
        self.passes, self.verify = passes, verify
        self._last = 0.0
        self._t0 = time.monotonic()
        self._base = 0
        self._offset: int | None = None  # bytes of the whole job before this phase
        # the whole job's rate, for its ETA: a new pass starts with no rate of its own, and
        # the ETA must not vanish (or jump) at every pass boundary
        self._job_t0: float | None = None
        self._job_base = 0

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            write(self.path, self.job)

    def start(self, phase: str, label: str, total: int, done: int = 0) -> None:
        self._t0, self._base = time.monotonic(), done
        self._offset = whole_job_offset(phase, total, self.passes)
        if self._offset is not None:
            self.job["overall_total"] = (self.passes + int(self.verify)) * total
        self.job.update(phase=label, done=done, total=total, bytes_per_second=None)
        self._overall(done, 0.0)
        self._flush(force=True)

    def update(self, done: int) -> None:
        rate = (done - self._base) / max(time.monotonic() - self._t0, 1e-9)
        self.job.update(done=done, bytes_per_second=round(rate))
        self._overall(done, rate)
        self._flush()

    def _overall(self, done: int, rate: float) -> None:
        if self._offset is None:
            return
        self.job["overall_done"] = overall = self._offset + done
        now = time.monotonic()
        if self._job_t0 is None:
            self._job_t0, self._job_base = now, overall
        elif now > self._job_t0 and overall > self._job_base:
            rate = (overall - self._job_base) / (now - self._job_t0)
        left = int(self.job["overall_total"]) - overall
        self.job["eta_seconds"] = round(left / rate, 1) if rate > 0 else None

    def end(self) -> None:
        self.job["done"] = self.job.get("total", 0)
        self._flush(force=True)


def find(db: Path, job_id: str) -> tuple[Path, dict[str, Any]]:
    """The file and contents of job `job_id` (NotFound names the listing command)."""
    path = jobs_dir(db) / f"{job_id}.json"
    if "/" in job_id or not path.is_file():
        raise NotFound(f"no job {job_id!r}; `vmshield job status` lists them")
    return path, read(path)


def _is_worker(pid: int, path: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"keystore.services.destroy" in argv and os.fsencode(path) in argv


def cancel(db: Path, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Stop a running job's worker (SIGTERM) and wait until it has recorded that; the job.

    The erase stops where it is; its journal lets the same destroy command continue."""
    path, job = find(db, job_id)
    pid = int(job.get("pid") or 0)
    if job["state"] != RUNNING or not _is_worker(pid, path):
        raise Conflict(f"job {job_id} is {job['state']}: nothing to cancel")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return read(path)
