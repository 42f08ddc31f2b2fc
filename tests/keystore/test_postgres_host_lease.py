"""The cluster-wide lease with the host disk server (issue 22): one lease per served export.

On a PostgreSQL keystore each export added to the host server has its own lease holder, whose
fence pipe goes to the server with the add (SCM_RIGHTS). A lost lease fences only that export:
its I/O is refused at once, the holder removes it when it can (session ended), and the host
server with its other exports goes on. Real PostgreSQL, real host nbdkit, libnbd as client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from keystore.cli import main
from keystore.postgres import repository as pg_repo
from keystore.services import hostdisk
from keystore.services.nbdproc import HostFiles
from tests.support.cli import FAST
from tests.support.postgres import Cluster

VMSHIELD = str(Path(sys.executable).parent / "vmshield")
PW = b"disk-password-4711"


@pytest.fixture
def keystore(pg_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(pg_repo, "AuthPolicy", lambda: FAST)
    url = pg_cluster.keystore()
    for args, secret in (
        (("user", "add", "alice"), PW + b"\n"),
        (("vm", "add", "web1", "--owner", "alice"), None),
        (("disk", "create", "web1", "--size", "8M", "--pbkdf-iterations", "1000",
          "--path", str(tmp_path / "web1-0.img")), PW + b"\n"),
        (("disk", "create", "web1", "--size", "8M", "--pbkdf-iterations", "1000",
          "--path", str(tmp_path / "web1-1.img")), PW + b"\n"),
    ):  # fmt: skip
        r = CliRunner().invoke(main, list(args), input=secret, env={"VMSHIELD_DB": url})
        assert r.exit_code == 0, r.output
    return url


def vmshield(url: str, *args: str, secret: bytes | None = None) -> str:
    r = subprocess.run([VMSHIELD, *args], input=None if secret is None else secret.decode(),
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "VMSHIELD_DB": url})  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def leases(url: str) -> dict[str, int]:
    """export name -> the holder's database backend pid."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT holder, backend FROM leases").fetchall()
    return {str(h).rsplit(" export ", 1)[1]: int(b) for h, b in rows if " export " in str(h)}


def holder_pid(name: str, run_dir: Path) -> int:
    needle = os.fsencode(run_dir / f"{name}.sock")
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"keystore.services.lease" in argv and needle in argv:
                return int(d.name)
    raise AssertionError(f"no lease holder for {name}")


def write_fails(uri: str) -> bool:
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA)
    except nbd.Error:
        return True
    finally:
        h.shutdown()
    return False


def test_a_lost_lease_fences_only_its_export(keystore: str, sockdir: Path) -> None:
    run = sockdir / "hostA"
    uris = {}
    for disk in ("web1-0", "web1-1"):
        out = vmshield(keystore, "disk", "serve", disk, "--run-dir", str(run), "--json",
                       secret=PW + b"\n")  # fmt: skip
        uris[disk] = out.split('"uri": "')[1].split('"')[0]
    host = HostFiles(run)
    server = hostdisk.ping(host)
    held = leases(keystore)
    assert set(held) == {"web1-0", "web1-1"} and len(set(held.values())) == 2
    assert not write_fails(uris["web1-0"]) and not write_fails(uris["web1-1"])

    # web1-0's holder loses its session: it fences and removes that export, nothing else
    with psycopg.connect(keystore, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (held["web1-0"],))
    deadline = time.monotonic() + 15
    while "web1-0" in (hostdisk.exports(host) or {"web1-0": None}):
        assert time.monotonic() < deadline, "the fenced export is still served"
        time.sleep(0.05)
    log = (run / "web1-0.lease.log").read_text()
    assert "lease of web1-0 lost" in log and f"removing export web1-0 of pid {server}" in log
    assert hostdisk.ping(host) == server and set(hostdisk.exports(host) or {}) == {"web1-1"}
    assert not write_fails(uris["web1-1"])

    # web1-1's holder is SIGKILLed: the kernel closes its fence pipe, the export's I/O fails
    os.kill(holder_pid("web1-1", run), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not write_fails(uris["web1-1"]):
        assert time.monotonic() < deadline, "the export went on writing without its lease"
        time.sleep(0.05)
    assert hostdisk.ping(host) == server  # the server itself stays
    vmshield(keystore, "disk", "stop", "web1-1", "--force")
    vmshield(keystore, "disk", "stop", "web1-0")
    assert hostdisk.exports(host) == {}
    os.kill(server or 0, signal.SIGTERM)
