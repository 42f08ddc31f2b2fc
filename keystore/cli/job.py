"""`vmshield job ...`: background jobs (`vmshield disk destroy --background`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from keystore.cli.options import db_option, emit_json, json_option, resolve_db, table
from keystore.services import jobs


@click.group()
def job() -> None:
    """Follow background jobs (`vmshield disk destroy --background`)."""


def _progress(j: dict[str, Any]) -> str:
    total = j.get("total") or 0
    if j["state"] != jobs.RUNNING or not total:
        return "-"
    return f"{j.get('phase', '')} {100 * int(j.get('done', 0)) // total}%"


@click.command("status")
@click.argument("job_id", required=False)
@json_option
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
