"""Background jobs of the CLI (so far: `disk destroy --background`), as small JSON files.

The keystore has no jobs table; a job is one file `<db dir>/jobs/<id>.json`, written
atomically by the worker process, read by `vmshield job status`. A job whose worker died
(crash, kill, reboot) shows as "interrupted": the erase journal lets the same
`vmshield disk destroy` command continue it.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from nbd_plugin.erase.progress import Reporter

RUNNING = "running"
DONE = "done"
FAILED = "failed"
INTERRUPTED = "interrupted"


def jobs_dir(db: Path) -> Path:
    """Where the jobs of keystore `db` live."""
    return db.parent / "jobs"


def new_id(kind: str) -> str:
    """A short unique job id."""
    return f"{kind}-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"


def write(path: Path, job: dict[str, Any]) -> None:
    """Replace the job file atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(job, f, sort_keys=True)
    os.replace(tmp, path)


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
    job: dict[str, Any] = json.loads(path.read_text())
    if job.get("state") == RUNNING and not _alive(int(job.get("pid") or 0)):
        job["state"] = INTERRUPTED
    return job


def list_jobs(db: Path) -> list[dict[str, Any]]:
    """Every job of this keystore, oldest first."""
    d = jobs_dir(db)
    if not d.is_dir():
        return []
    return sorted((read(p) for p in d.glob("*.json")), key=lambda j: str(j.get("started")))


class JobReporter(Reporter):
    """Erase progress into the job file, at most every `interval` seconds."""

    def __init__(self, path: Path, job: dict[str, Any], interval: float = 0.5) -> None:
        self.path, self.job, self.interval = path, job, interval
        self._last = 0.0
        self._t0 = time.monotonic()
        self._base = 0

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            write(self.path, self.job)

    def start(self, phase: str, label: str, total: int, done: int = 0) -> None:
        self._t0, self._base = time.monotonic(), done
        self.job.update(phase=label, done=done, total=total, bytes_per_second=None)
        self._flush(force=True)

    def update(self, done: int) -> None:
        rate = (done - self._base) / max(time.monotonic() - self._t0, 1e-9)
        self.job.update(done=done, bytes_per_second=round(rate))
        self._flush()

    def end(self) -> None:
        self.job["done"] = self.job.get("total", 0)
        self._flush(force=True)
