"""`vmshield job ...`: background jobs (`vmshield disk destroy --background`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from keystore.auth import human_duration
from keystore.cli.options import db_option, emit_json, json_option, resolve_db, table
from keystore.location import Location
from keystore.services import jobs


@click.group()
def job() -> None:
    """Follow and cancel background jobs (`vmshield disk destroy --background`)."""


def _percent(done: Any, total: Any) -> str:
    return f"{100 * int(done or 0) // int(total)}%" if total else "-"


def _progress(j: dict[str, Any]) -> str:
    if j["state"] != jobs.RUNNING or not j.get("total"):
        return "-"
    return f"{j.get('phase', '')} {_percent(j.get('done'), j['total'])}"


def _overall(j: dict[str, Any]) -> str:
    if j["state"] == jobs.DONE:
        return "100%"
    if j["state"] != jobs.RUNNING or not j.get("overall_total"):
        return "-"
    return _percent(j.get("overall_done"), j["overall_total"])


def _eta(j: dict[str, Any]) -> str:
    eta = j.get("eta_seconds")
    return human_duration(eta) if j["state"] == jobs.RUNNING and eta is not None else "-"


def _shown(j: dict[str, Any]) -> dict[str, Any]:
    """The job as printed: times in ISO 8601 UTC, not epoch seconds."""
    return {**j, "started": jobs.iso(j.get("started")), "finished": jobs.iso(j.get("finished"))}


def _table(selected: list[dict[str, Any]]) -> None:
    rows = [
        [j["id"], j["disk"], j["method"], j["state"], _progress(j), _overall(j), _eta(j),
         jobs.iso(j.get("started")) or "-", jobs.iso(j.get("finished")) or "-"]
        for j in selected
    ]  # fmt: skip
    table(rows, ["id", "disk", "method", "state", "phase", "overall", "eta", "started",
                 "finished"])  # fmt: skip


def _select(db: Path, job_id: str | None) -> list[dict[str, Any]]:
    if job_id is None:
        return jobs.list_jobs(db)
    return [jobs.find(db, job_id)[1]]


@click.command("status")
@click.argument("job_id", required=False)
@click.option("--watch", is_flag=True, help="Refresh until no shown job runs any more.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@json_option
@db_option
def status(
    job_id: str | None, watch: bool, interval: float, as_json: bool, db: Location | None
) -> None:
    """Show one job (JOB_ID), or every job of this keystore: the phase, the whole job's
    progress and its ETA (every pass and the read-back), start and end in UTC.

    States: running, done, failed, cancelled (`vmshield job cancel`), interrupted (the
    worker died). A cancelled or interrupted destroy continues from its erase journal
    when the same `vmshield disk destroy` runs again. With --watch the exit status is 1
    if a watched job did not end done.
    """
    path = resolve_db(db)
    selected = _select(path, job_id)
    while True:
        if as_json:
            shown = [_shown(j) for j in selected]
            emit_json(shown[0] if job_id else shown)
        else:
            _table(selected)
        running = any(j["state"] == jobs.RUNNING for j in selected)
        if not watch or not running:
            break
        time.sleep(interval)
        selected = [jobs.find(path, j["id"])[1] for j in selected]
        if not as_json:
            click.echo("")
    if job_id is not None and not as_json:
        j = selected[0]
        for key in ("certificate", "sha256", "nist_sp800_88_rev2", "error", "log"):
            if j.get(key):
                click.echo(f"{key}: {j[key]}")
    if watch and any(j["state"] != jobs.DONE for j in selected):
        raise SystemExit(1)


@click.command("cancel")
@click.argument("job_id")
@db_option
def cancel(job_id: str, db: Location | None) -> None:
    """Stop the running job JOB_ID where it is.

    The erase stops between two writes and the disk is marked failed: the keyslots may
    already be gone (then the data is unreadable), but the overwrite is incomplete. Run
    the same `vmshield disk destroy DISK --method METHOD` to continue from its journal.
    """
    j = jobs.cancel(resolve_db(db), job_id)
    if j["state"] == jobs.RUNNING:
        raise click.ClickException(f"job {job_id} did not stop within 30 s (pid {j['pid']})")
    click.echo(f"job {job_id} {j['state']}" + (f": {j['error']}" if j.get("error") else ""))
