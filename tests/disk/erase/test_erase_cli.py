"""`vmshield image erase`, `vmshield disk destroy` and `vmshield job status` (CliRunner)."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner, Result

from keystore.auth import AuthPolicy
from keystore.cli import main
from keystore.models import DiskState
from keystore.sqlite import repository as sqlite_repo
from keystore.sqlite.repository import SqliteRepository
from tests.support.erase import MIB, make_luks, opens

FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


def vms(*args: str, code: int = 0, input: str | None = None) -> Result:
    result = CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def _lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_image_erase_json_lines_and_full_order(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    make_luks(img)
    events = _lines(vms("image", "erase", str(img), "-m", "dod3", "--json", "--yes").output)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "phase" and kinds[-1] == "done"
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases == ["crypto", "pass1", "pass2", "pass3", "verify"]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and all(
        {"bytes_per_second", "eta_seconds", "done", "total"} <= e.keys() for e in progress
    )
    done = events[-1]
    assert not img.exists()
    assert hashlib.sha256(Path(done["certificate"]).read_bytes()).hexdigest() == done["sha256"]
    assert done["result"]["unlinked"] is True


def test_image_erase_shows_the_whole_erase_with_its_own_eta(tmp_path: Path) -> None:
    """Beside each pass's bar, one for every pass and the read-back together: its ETA is
    the whole erase's, not the current pass's."""
    img = tmp_path / "d.img"
    make_luks(img)
    bars = vms("image", "erase", str(img), "-m", "dod3", "--yes").output.splitlines()
    names = [line.split("\u2501")[0].strip() for line in bars if "\u2501" in line]
    assert names == ["wiping key material", "all 3 pass(es) + verify", "pass 1/3 (00)",
                     "pass 2/3 (ff)", "pass 3/3 (random)", "verifying pass 3"], bars  # fmt: skip
    [whole] = [line for line in bars if line.startswith("all 3 pass(es)")]
    done, total = whole.split("\u2501")[-1].split()[0].split("/")
    assert done == total, whole  # finished: every pass and the read-back counted


def test_image_erase_wants_yes_without_a_terminal(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    make_luks(img)
    result = vms("image", "erase", str(img), "-m", "zero", code=2)
    assert "--yes" in result.output
    assert opens(img)


def test_image_erase_of_a_locked_image_exits_75(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    make_luks(img)
    with open(img, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_SH)
        result = vms("image", "erase", str(img), "-m", "zero", "--yes", code=75)
    assert "in use" in result.output
    assert opens(img)


# -- disk destroy ------------------------------------------------------------------------


@pytest.fixture
def ks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "ks.db"
    monkeypatch.setenv("VMSHIELD_DB", str(db))
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    vms("init")
    vms("user", "add", "alice", input="s3cret-horse-battery\n")
    vms("vm", "add", "web1", "--owner", "alice")
    return db


def _add_disk(db: Path, name: str) -> Path:
    img = db.parent / f"{name}.img"
    make_luks(img)

    async def go() -> None:
        async with await SqliteRepository.open(db) as repo:
            await repo.add_disk(
                "web1",
                name,
                str(img),
                fmt="luks1",
                cipher="aes-xts-plain64",
                size=14 * MIB,
                actor="test",
                state=DiskState.READY,
            )

    asyncio.run(go())
    return img


def _state(db: Path, name: str) -> str:
    async def go() -> str:
        async with await SqliteRepository.open(db) as repo:
            return (await repo.get_disk(name)).state.value

    return asyncio.run(go())


def _audit(db: Path) -> list[dict[str, Any]]:
    return list(json.loads(vms("audit", "--json").output))


@pytest.mark.parametrize(
    ("deep", "normal", "method", "allowed"),
    [
        (None, None, "dod3", True),  # defaults: deep erase yes, normal delete no
        (None, None, "crypto", False),
        ("no", "yes", "zero", False),
        ("no", "yes", "crypto", True),
        ("no", "no", "crypto", False),
        ("yes", "yes", "random", True),
    ],
)
def test_destroy_follows_the_vms_erase_permissions(
    ks: Path, deep: str | None, normal: str | None, method: str, allowed: bool
) -> None:
    img = _add_disk(ks, "web1-0")
    if deep or normal:
        vms("perm", "set", "web1", "--deep-erase", deep or "yes", "--normal-delete", normal or "no")
    result = vms("disk", "destroy", "web1-0", "-m", method, "--yes", code=0 if allowed else 77)
    if allowed:
        assert _state(ks, "web1-0") == "destroyed" and not img.exists()
    else:
        assert "vmshield perm set web1" in result.output
        assert _state(ks, "web1-0") == "ready" and opens(img)
        denied = [a for a in _audit(ks) if a["action"] == "disk.destroy.denied"]
        assert denied and denied[-1]["detail"]["method"] == method


def test_destroy_puts_the_certificate_hash_in_the_audit_chain(ks: Path) -> None:
    _add_disk(ks, "web1-0")
    done = _lines(vms("disk", "destroy", "web1-0", "-m", "zero", "--yes", "--json").output)[-1]
    cert = Path(done["certificate"])
    sha = hashlib.sha256(cert.read_bytes()).hexdigest()
    last = [a for a in _audit(ks) if a["action"] == "disk.state"][-1]
    assert last["detail"]["to"] == "destroyed"
    assert last["detail"]["certificate_sha256"] == sha == done["sha256"]
    assert last["detail"]["nist_sp800_88_rev2"] == "Purge"
    vms("audit", "verify")


def test_destroy_of_a_served_disk_is_refused_and_leaves_it_ready(ks: Path) -> None:
    img = _add_disk(ks, "web1-0")
    with open(img, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = vms("disk", "destroy", "web1-0", "-m", "zero", "--yes", code=75)
    assert "vmshield disk stop web1-0" in result.output
    assert _state(ks, "web1-0") == "ready" and opens(img)


def test_destroy_in_the_background_is_followed_by_job_status(ks: Path) -> None:
    img = _add_disk(ks, "web1-0")
    job = json.loads(
        vms("disk", "destroy", "web1-0", "-m", "dod3", "--yes", "--background", "--json").output
    )
    deadline = time.monotonic() + 60
    while True:
        status = json.loads(vms("job", "status", job["id"], "--json").output)
        if status["state"] != "running":
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["state"] == "done", Path(job["log"]).read_text()
    assert status["disk"] == "web1-0" and status["nist_sp800_88_rev2"] == "Purge"
    assert hashlib.sha256(Path(status["certificate"]).read_bytes()).hexdigest() == status["sha256"]
    assert _state(ks, "web1-0") == "destroyed" and not img.exists()
    table = vms("job", "status").output
    assert job["id"] in table and "done" in table


def test_ctrl_c_says_how_to_resume_and_the_rerun_finishes(tmp_path: Path) -> None:
    from keystore.services.erasing import run_erase
    from keystore.services.interrupts import Interrupted
    from nbd_plugin.erase import EraseOptions
    from nbd_plugin.erase.progress import Reporter

    class CtrlC(Reporter):
        def start(self, phase: str, label: str, total: int, done: int = 0) -> None:
            if phase == "pass2":
                raise KeyboardInterrupt

    img = tmp_path / "d.img"
    make_luks(img)
    with pytest.raises(Interrupted, match="run the same command again") as exc:
        run_erase(str(img), "dod3", EraseOptions(), CtrlC())
    assert exc.value.exit_code == 130
    assert Path(str(img) + ".vmshield-erase").exists() and not opens(img)
    events = _lines(vms("image", "erase", str(img), "-m", "dod3", "--json", "--yes").output)
    assert events[0] == {"event": "resumed", "phase": "overwrite", "pass": 2, "done": 0}
    assert events[-1]["result"]["resumed"] == 1 and not img.exists()


def test_a_job_whose_worker_died_shows_as_interrupted(ks: Path) -> None:
    import subprocess

    from keystore.services import jobs

    dead = subprocess.Popen(["true"])
    dead.wait()
    path = jobs.jobs_dir(ks) / "destroy-x.json"
    jobs.write(
        path,
        {
            "id": "destroy-x",
            "disk": "web1-0",
            "method": "dod3",
            "state": "running",
            "pid": dead.pid,
            "started": time.time(),
        },
    )
    assert json.loads(vms("job", "status", "destroy-x", "--json").output)["state"] == "interrupted"
    vms("job", "status", "nope", code=1)
