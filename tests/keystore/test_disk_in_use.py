"""`disk stop` and `disk destroy` refuse a disk in use and name who uses it (issue 26 items
2 and 5): a real QEMU (TCG) connected over NBD, a by-hand nbdkit holding the image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.keystore.test_cli_disk_serve import PW, cli, env, serve

__all__ = ["env"]  # the fixture, used by name


def _connected(sock: Path, pid: int) -> bool:
    from keystore.services import usage

    return any(c.pid == pid for c in usage.clients(sock))


@pytest.fixture
def qemu(env: tuple[Path, Path]) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """web1-0 served by vmshield, a paused TCG QEMU attached to it (a guest's disk)."""
    db, sockdir = env
    info = serve(db, sockdir)
    sock = Path(info["socket"])
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-S", "-nodefaults", "-display", "none",
         "-name", "guest=web1", "-drive", f"file={info['uri']},format=raw,if=virtio"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _connected(sock, proc.pid):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "QEMU did not connect"
            time.sleep(0.1)
        yield db, sock, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_stop_and_destroy_refuse_a_disk_a_guest_uses_and_name_it(
    qemu: tuple[Path, Path, subprocess.Popen[bytes]],
) -> None:
    db, sock, proc = qemu
    [st] = json.loads(cli(db, "status", "--json").stdout)["disks"]
    assert st["disk"] == "web1-0" and st["vm"] == "web1" and st["readonly"] is False
    assert st["started_by"].startswith("CLI (") and st["socket"] == str(sock)
    assert [c["pid"] for c in st["clients"]] == [proc.pid], st
    assert st["clients"][0]["command"].startswith("qemu-system-x86_64 -accel tcg")
    # the plugin's log: one timestamped line per connect and disconnect
    subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"], check=True, timeout=30)
    log = sock.with_suffix(".log").read_text()
    both = r"Z vmshield: client #2 connected \(read-write\); 2 open\n.*Z vmshield: a client disc"
    assert re.search(both + r"onnected; 1 open$", log, re.M | re.S), log
    assert re.search(r"^20\d\d-\d\d-\d\dT[\d:.]+Z vmshield: client #1 connected \(read-write\); "
                     r"1 open$", log, re.M), log  # fmt: skip
    r = cli(db, "disk", "stop", "web1-0", code=75)
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert f"still in use by NBD client pid {proc.pid}: qemu-system-x86_64" in line, line
    assert "--force" in line, line
    served = json.loads(cli(db, "disk", "list", "--json").stdout)[0]["server"]
    assert served["alive"] is True  # nothing was stopped
    nbdkit_pid = served["pid"]

    r = cli(db, "disk", "destroy", "web1-0", "--method", "zero", "--yes", code=75)
    assert f"held by pid {nbdkit_pid}: nbdkit -U {sock}" in r.stderr, r.stderr
    assert json.loads(cli(db, "disk", "list", "--json").stdout)[0]["state"] == "ready"

    cli(db, "disk", "stop", "web1-0", "--force")
    assert json.loads(cli(db, "disk", "list", "--json").stdout)[0]["server"] is None


@pytest.mark.slow
def test_a_server_started_by_hand_is_named_and_listed(
    env: tuple[Path, Path], tmp_path: Path
) -> None:
    db, sockdir = env
    image = json.loads(cli(db, "disk", "list", "--json").stdout)[0]["path"]
    keyfile = tmp_path / "key"
    keyfile.write_bytes(PW)
    keyfile.chmod(0o600)
    sock = sockdir / "byhand.sock"
    pidfile = sockdir / "byhand.pid"
    from keystore.services.nbdproc import plugin_path

    subprocess.run(
        ["nbdkit", "-U", str(sock), "-P", str(pidfile), "python", str(plugin_path()),
         f"image={image}", f"passphrase=+{keyfile}"],
        check=True, timeout=60, capture_output=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10  # the forked server writes its pid file after the fork
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline, "nbdkit wrote no pid file"
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    try:
        held = f"held by pid {pid}: nbdkit -U {sock}"
        r = cli(db, "disk", "stop", "web1-0", code=1)
        assert "not served by vmshield" in r.stderr and held in r.stderr, r.stderr
        r = cli(db, "disk", "serve", "web1-0", "--socket", str(sockdir / "x.sock"), code=75,
                secret=PW + b"\n")  # fmt: skip
        assert "served outside vmshield" in r.stderr and held in r.stderr, r.stderr
        r = cli(db, "disk", "destroy", "web1-0", "--method", "zero", "--yes", code=75)
        assert held in r.stderr, r.stderr
        listed = json.loads(cli(db, "disk", "list", "--json").stdout)[0]
        assert listed["server"] is None
        [outside] = listed["outside"]
        assert outside["pid"] == pid and outside["command"].startswith(f"nbdkit -U {sock} "), (
            outside
        )
        [st] = json.loads(cli(db, "status", "--json").stdout)["disks"]
        assert (st["pid"], st["socket"], st["started_by"]) == (
            pid, str(sock), "outside vmshield (by hand)"), st  # fmt: skip
        table = cli(db, "disk", "list").stdout
        assert f"outside vmshield (pid {pid})" in table, table
    finally:
        os.kill(pid, 15)
