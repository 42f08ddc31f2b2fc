"""Day-to-day operation through the real `vmshield` command (issue 26): lockout messages,
non-root refusals, audit browsing, job status."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keystore.sqlite import repository as sqlite_repo
from tests.support.cli import FAST, PW, js, vms

VMSHIELD = str(Path(sys.executable).parent / "vmshield")


def as_nobody(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real command as uid 65534 (what a non-root admin runs)."""
    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": "/nonexistent"}
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", VMSHIELD, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=base,
        input=input,
        check=False,
    )


# -- 11: lockout -------------------------------------------------------------------------


def test_lockout_counts_down_names_the_lock_time_and_the_unlock_command(ready: Path) -> None:
    said = []
    for _ in range(5):
        r = vms("user", "passwd", "alice", input="wrong-password\nnew-password-1\n", code=77)
        said.append(r.output.strip().splitlines()[-1])
    for left, line in zip((4, 3, 2, 1), said, strict=False):
        s = "s" if left > 1 else ""
        assert f"{left} attempt{s} left before a 15 min lock" in line, line
    assert "the account is now locked for 15 min" in said[4], said[4]
    assert "`vmshield user unlock alice`" in said[4], said[4]
    r = vms("user", "passwd", "alice", input=f"{PW}\nnew-password-1\n", code=77)
    line = r.output.strip().splitlines()[-1]
    assert re.search(r"locked until 20\S+ [\d:]+ UTC \(another 1[45] min( \d+ s)?\)", line), line
    assert ") after 5 failed attempts" in line and "vmshield user unlock alice" in line, line
    assert "Traceback" not in r.output


# -- 12: non-root ------------------------------------------------------------------------


def test_install_hook_as_non_root_names_its_own_option(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    hooks = tmp_path / "hooks"
    r = as_nobody("libvirt", "install-hook", "--hooks-dir", str(hooks),
                  "--config", str(tmp_path / "h.conf"), "--db", str(tmp_path / "k.db"))  # fmt: skip
    assert r.returncode == 1, r
    assert "--socket" not in r.stderr and "--run-dir DIR" in r.stderr, r.stderr
    assert "sudo vmshield libvirt install-hook" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not hooks.exists()


def test_vm_unlock_as_non_root_refuses_and_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a keystore uid 65534 may use: before the fix the unlock "succeeded" into its keyring
    base = Path(tempfile.mkdtemp(prefix="vmshield-nobody-"))
    try:
        os.chown(base, 65534, 65534)
        db = base / "ks.db"
        monkeypatch.setenv("VMSHIELD_DB", str(db))
        monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
        vms("init")
        vms("user", "add", "alice", input=PW + "\n")
        vms("vm", "add", "web1", "--owner", "alice")
        for p in base.iterdir():
            os.chown(p, 65534, 65534)
        r = as_nobody("vm", "unlock", "web1", "--db", str(db), input=PW + "\n")
        assert r.returncode == 1, r
        assert "must run as root" in r.stderr and "sudo vmshield vm unlock web1" in r.stderr
        assert "enroll-host" in r.stderr and "Traceback" not in r.stderr
        assert "vm.unlock" not in [a["action"] for a in js("audit")]  # refused before anything
    finally:
        shutil.rmtree(base)


# -- 6: status: pending unlocks, unattended disks ---------------------------------------


def test_status_shows_a_pending_unlock_with_its_expiry_and_an_enrolled_disk(
    ready: Path, tmp_path: Path
) -> None:
    vms("disk", "create", "web1", "--size", "4M", "--pbkdf-iterations", "1000", input=PW + "\n")
    vms("disk", "enroll-host", "web1-0", "--host-key", str(tmp_path / "hk" / "host.key"),
        input=PW + "\n")  # fmt: skip
    before = datetime.now(UTC)
    vms("vm", "unlock", "web1", "--for", "7m", input=PW + "\n")
    try:
        st = js("status")
        [pending] = st["pending_unlocks"]
        expires = datetime.fromisoformat(pending["expires"])
        assert pending["vm"] == "web1"
        assert before + timedelta(minutes=7) <= expires <= datetime.now(UTC) + timedelta(minutes=7)
        [enrolled] = st["unattended"]
        assert (enrolled["disk"], enrolled["vm"]) == ("web1-0", "web1")
        assert enrolled["host_key"] == str(tmp_path / "hk" / "host.key")
        assert st["disks"] == [] and st["usbgates"] == []
        text = vms("status").output
        assert re.search(r"^web1 +20\d\d-\d\d-\d\d [\d:]+ +[67] min( \d+ s)?$", text, re.M), text
        assert re.search(r"^web1-0 +web1 +20", text, re.M), text
    finally:
        vms("vm", "unlock", "web1", "--cancel")
    assert js("status")["pending_unlocks"] == []
    vms("disk", "unenroll-host", "web1-0", "--host-key", str(tmp_path / "hk" / "host.key"))
    assert js("status")["unattended"] == []


# -- 9: job status: ISO times, overall ETA, --watch, cancel ------------------------------

ISO = r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture
def shm() -> Iterator[Path]:
    """Images in memory: an erase of hundreds of MiB without loading the shared disk."""
    path = Path(tempfile.mkdtemp(prefix="vmshield-job-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _disk_with_data(where: Path, name: str, mib: int) -> Path:
    image = where / f"{name}.img"
    vms("disk", "create", "web1", "--name", name, "--size", f"{mib + 8}M", "--path", str(image),
        "--pbkdf-iterations", "1000", input=PW + "\n")  # fmt: skip
    with image.open("r+b") as f:  # allocated extents, as a used disk has: what passes overwrite
        f.seek(16 << 20)
        chunk = b"\x5a" * (1 << 20)
        for _ in range(mib):
            f.write(chunk)
    return image


def test_job_status_shows_iso_times_and_an_overall_eta_and_a_job_can_be_cancelled(
    ready: Path, shm: Path
) -> None:
    _disk_with_data(shm, "big", 512)
    job = js("disk", "destroy", "big", "-m", "dod7", "--yes", "--background")
    deadline = time.monotonic() + 120
    while True:
        st = js("job", "status", job["id"])
        if st["state"] != "running" or (st.get("overall_done") and st.get("eta_seconds")):
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    assert st["state"] == "running", st
    assert re.fullmatch(ISO, st["started"]) and st["finished"] is None, st
    assert st["overall_total"] == 8 * st["total"]  # 7 passes and the read-back
    assert 0 < st["overall_done"] < st["overall_total"] and st["eta_seconds"] > 0
    row = vms("job", "status").output.splitlines()[1]
    want = rf"{job['id']} +big +dod7 +running +pass \d/7 \(\w+\) \d+% +\d+% +\d.* +{ISO} +-"
    assert re.fullmatch(want, row), row
    r = vms("job", "cancel", job["id"])
    assert f"job {job['id']} cancelled" in r.output and "vmshield disk destroy big" in r.output
    st = js("job", "status", job["id"])
    assert st["state"] == "cancelled" and re.fullmatch(ISO, st["finished"]), st
    assert js("disk", "list")[-1]["state"] == "failed"
    r = vms("job", "cancel", job["id"], code=1)
    assert "is cancelled: nothing to cancel" in r.output

    _disk_with_data(shm, "small", 1)
    job = js("disk", "destroy", "small", "-m", "zero", "--yes", "--background")
    r = vms("job", "status", job["id"], "--watch", "--interval", "0.2")
    last = [line for line in r.output.splitlines() if line.startswith(job["id"])][-1]
    assert re.search(rf" done +- +100% +- +{ISO} +{ISO}$", last), r.output
    assert "certificate: " in r.output


# -- 10: audit browsing ------------------------------------------------------------------


def test_audit_filters_by_action_actor_and_time(ready: Path) -> None:
    vms("user", "passwd", "alice", input="wrong-password\nnew-password-1\n", code=77)
    every = js("audit")
    assert {r["action"] for r in js("audit", "--action", "auth.*")} == {"auth.fail"}
    both = js("audit", "--action", "vm.add", "--action", "user.add")
    assert [r["action"] for r in both] == ["user.add", "vm.add"]
    me = every[-1]["actor"]
    assert len(js("audit", "--actor", me)) == len(every)
    assert js("audit", "--actor", "mallory") == []
    assert js("audit", "--since", "1h") == every
    assert js("audit", "--until", "2000-01-01") == []
    middle = every[len(every) // 2]
    since = js("audit", "--since", middle["ts"][:19])  # to the second, UTC, no zone
    assert since[0]["seq"] <= middle["seq"] and since[-1] == every[-1]
    assert [r["seq"] for r in js("audit", "--action", "*", "--limit", "2")] == [
        every[-2]["seq"], every[-1]["seq"]]  # fmt: skip
    r = vms("audit", "--since", "yesterday", code=2)
    assert "use ISO 8601 in UTC" in r.output and "Traceback" not in r.output


def test_login_rows_carry_the_vm_they_open_disks_for(ready: Path) -> None:
    args = ("disk", "create", "web1", "--size", "1M", "--iter-time", "50")
    vms(*args, input="wrong-password\n", code=77)
    vms(*args, input=PW + "\n")
    vms("user", "passwd", "alice", input="wrong-password\nnew-password-1\n", code=77)
    logins = [(r["action"], r["vm"]) for r in js("audit", "--action", "auth.*")]
    # disk create logs in for web1 (the create itself checks the password once more)
    assert logins[0] == ("auth.fail", "web1") and logins[-1] == ("auth.fail", None)
    assert set(logins[1:-1]) == {("auth.ok", "web1")}, logins
    assert len(js("audit", "--vm", "web1", "--action", "auth.*")) == len(logins) - 1


def test_audit_rows_wrap_to_the_terminal_width(
    ready: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vms("disk", "create", "web1", "--size", "1M", "--iter-time", "50", input=PW + "\n")
    rows = js("audit")
    details = [" ".join(f"{k}={v}" for k, v in sorted(r["detail"].items())) for r in rows]
    assert max(map(len, details)) > 60  # some rows cannot fit 80 columns on one line
    squeezed = [d.replace(" ", "") for d in details]
    piped = vms("audit").output.splitlines()  # a pipe: a row per line, for grep
    assert len(piped) == 1 + len(rows)
    start = piped[0].index("DETAIL")  # where the detail column starts on one line
    monkeypatch.setenv("COLUMNS", str(start + 40))  # room for a detail beside its row
    lines = vms("audit").output.splitlines()
    assert len(lines) > len(piped) and max(map(len, lines)) <= start + 40, lines
    assert lines[0] == piped[0]
    rejoined: list[str] = []
    for line in lines[1:]:
        if line[:start].strip():  # a row's first line
            rejoined.append(line[start:])
        else:  # its detail continued, in the detail column
            rejoined[-1] += " " + line[start:]
    assert [d.replace(" ", "") for d in rejoined] == squeezed  # a long word is cut too
    monkeypatch.setenv("COLUMNS", str(start + 10))  # too narrow: each detail under its row
    lines = vms("audit").output.splitlines()
    assert max(map(len, lines)) <= start + 10 and "DETAIL" not in lines[0], lines
    rejoined = []
    for line in lines[1:]:
        if line.startswith("    "):
            rejoined[-1] += (" " if rejoined[-1] else "") + line[4:]
        else:
            rejoined.append("")
    assert [d.replace(" ", "") for d in rejoined] == squeezed


def test_audit_follow_prints_new_matching_rows_until_interrupted(ready: Path) -> None:
    p = subprocess.Popen(
        [VMSHIELD, "audit", "--follow", "--json", "--action", "vm.*"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "VMSHIELD_DB": str(ready)},
    )  # fmt: skip
    try:
        assert p.stdout is not None
        first = json.loads(p.stdout.readline())  # the existing row, then it waits
        assert (first["action"], first["vm"]) == ("vm.add", "web1")
        vms("user", "add", "bob", input=PW + "\n")  # not a vm.* row: not shown
        vms("vm", "add", "db1", "--owner", "bob")
        new = json.loads(p.stdout.readline())
        assert (new["action"], new["vm"]) == ("vm.add", "db1")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0 and out == "" and "Traceback" not in err, (out, err)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_named_process_never_shows_a_literal_passphrase() -> None:
    from keystore.services.usage import redact

    argv = ["/usr/bin/nbdkit", "-U", "/run/s.sock", "python", "plugin.py", "image=/d.img"]
    assert redact([*argv, "passphrase=+/root/web.key"]).endswith("passphrase=+/root/web.key")
    assert redact([*argv, "passphrase=-3"]).startswith("nbdkit -U /run/s.sock python ")
    shown = redact([*argv, "passphrase=my long secret"])
    assert "secret" not in shown and shown.endswith("passphrase=(hidden)"), shown


def test_status_lists_this_keystores_usbgate(ready: Path, shm: Path) -> None:
    sock = shm / "owners.sock"
    gate = subprocess.Popen(
        [str(Path(sys.executable).parent / "usbgate"), "run", "--vm", "web1", "--listen",
         f"unix:{sock}", "--qemu", f"unix:{shm / 'qemu.sock'}", "--db", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert gate.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        [shown] = js("status")["usbgates"]
        assert (shown["vm"], shown["pid"], shown["started_by"]) == (
            "web1", gate.pid, "outside the hook"), shown  # fmt: skip
        assert f"--vm web1 --listen unix:{sock}" in shown["command"]
    finally:
        gate.terminate()
        gate.wait(timeout=30)


def test_status_lists_the_vms_of_a_usbgate_host(ready: Path, shm: Path) -> None:
    control = shm / "usbgate.ctl"
    gate = subprocess.Popen(
        [str(Path(sys.executable).parent / "usbgate"), "host", "serve", "--control",
         str(control), "--vm", f"web1=unix:{shm / 'owners.sock'},unix:{shm / 'qemu.sock'}",
         "--db", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not control.exists():
            assert gate.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        [shown] = js("status")["usbgates"]
        assert (shown["vm"], shown["pid"], shown["started_by"]) == (
            "web1", gate.pid, "usbgate host"), shown  # fmt: skip
        assert f"host serve --control {control}" in shown["command"]
    finally:
        gate.terminate()
        gate.wait(timeout=30)
