"""`vmshield disk create|serve|stop|list` with real processes: the installed `vmshield`
script, a real nbdkit running the plugin, and reads/writes through libnbd."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from keystore.cli import main
from keystore.sqlite import repository as sqlite_repo
from tests.support.cli import FAST

VMSHIELD = str(Path(sys.executable).parent / "vmshield")
PW = b"disk-password-4711"
NEW_PW = b"another-password-0815"


def cli(
    db: Path, *args: str, secret: bytes | None = None, code: int = 0
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMSHIELD_DB": str(db)}
    p = subprocess.run(
        [VMSHIELD, *args],
        input=None if secret is None else secret.decode(),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert p.returncode == code, (p.stdout, p.stderr)
    return p


def inproc(db: Path, *args: str, secret: bytes | None = None) -> None:
    """Setup steps run in this process (fast); the behaviour under test runs in subprocesses."""
    r = CliRunner().invoke(
        main, list(args), input=secret, env={"VMSHIELD_DB": str(db)}, catch_exceptions=False
    )
    assert r.exit_code == 0, r.output


@pytest.fixture
def env(
    tmp_path: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Path]]:
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    db = tmp_path / "ks.db"
    inproc(db, "init")
    inproc(db, "user", "add", "alice", secret=PW + b"\n")
    inproc(db, "vm", "add", "web1", "--owner", "alice")
    inproc(
        db,
        "disk",
        "create",
        "web1",
        "--size",
        "8M",
        "--pbkdf-iterations",
        "1000",
        secret=PW + b"\n",
    )
    yield db, sockdir
    # never leave a server behind
    servers = json.loads(cli(db, "disk", "list", "--json").stdout)
    for d in servers:
        if d["server"] and d["server"]["alive"]:
            cli(db, "disk", "stop", d["name"])


def serve(db: Path, sockdir: Path, *extra: str, secret: bytes = PW) -> dict[str, Any]:
    out = cli(
        db,
        "disk",
        "serve",
        "web1-0",
        "--socket",
        str(sockdir / "web1-0.sock"),
        "--json",
        *extra,
        secret=secret + b"\n",
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def nbd_handle(uri: str) -> Any:
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_create_records_ready_disk(env: tuple[Path, Path]) -> None:
    db, _ = env
    disks = json.loads(cli(db, "disk", "list", "--json").stdout)
    assert len(disks) == 1 and disks[0]["state"] == "ready" and disks[0]["size"] == 8 << 20
    image = Path(disks[0]["path"])
    assert image.stat().st_mode & 0o777 == 0o600
    assert image.read_bytes()[:6] == b"LUKS\xba\xbe"


def test_serve_read_write_through_printed_uri(env: tuple[Path, Path]) -> None:
    db, sockdir = env
    info = serve(db, sockdir)
    assert info["uri"] == f"nbd+unix:///?socket={sockdir}/web1-0.sock"
    assert f"file={info['uri']},format=raw" in info["qemu_drive"]
    assert '<disk type="network"' in info["libvirt_xml"]
    assert '<source protocol="nbd">' in info["libvirt_xml"]
    # whoever can connect reads the plaintext: no one but the owner may write the socket
    assert (sockdir / "web1-0.sock").stat().st_mode & 0o022 == 0
    # qemu-img opens the printed URI too
    qi = subprocess.run(
        ["qemu-img", "info", "--output=json", info["uri"]],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(qi.stdout)["virtual-size"] == 8 << 20
    # the CLI process has exited; the server outlives it
    h = nbd_handle(info["uri"])
    try:
        assert h.get_size() == 8 << 20
        marker = b"vmshield-plaintext-marker" * 100
        h.pwrite(marker, 1 << 20)
        h.flush()
        assert h.pread(len(marker), 1 << 20) == marker
    finally:
        h.shutdown()
    image = Path(json.loads(cli(db, "disk", "list", "--json").stdout)[0]["path"])
    assert b"vmshield-plaintext-marker" not in image.read_bytes()  # ciphertext at rest
    vm = json.loads(cli(db, "vm", "show", "web1", "--json").stdout)["vm"]
    assert vm["access_count"] == 1 and vm["last_access"] is not None
    listing = cli(db, "disk", "list").stdout
    assert str(sockdir / "web1-0.sock") in listing
    # serving twice is refused while the first server runs
    r = cli(
        db,
        "disk",
        "serve",
        "web1-0",
        "--socket",
        str(sockdir / "b.sock"),
        secret=PW + b"\n",
        code=1,
    )
    assert "already served" in r.stderr
    cli(db, "disk", "stop", "web1-0")
    assert not (sockdir / "web1-0.sock").exists()
    assert not Path(f"/proc/{info['pid']}").exists() or _is_zombie(info["pid"])
    # data survived: serve again, read back
    info = serve(db, sockdir, "--readonly")
    h = nbd_handle(info["uri"])
    try:
        assert h.pread(len(marker), 1 << 20) == marker
        assert h.is_read_only()
    finally:
        h.shutdown()
    assert [a["action"] for a in json.loads(cli(db, "audit", "--json").stdout)].count(
        "disk.serve"
    ) == 2


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_no_secret_in_argv_environ_logs_or_database(env: tuple[Path, Path]) -> None:
    db, sockdir = env
    info = serve(db, sockdir)
    pid = info["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"nbdkit" in cmdline and b"passphrase=-" in cmdline
    log = (sockdir / "web1-0.log").read_bytes()
    with sqlite3.connect(db) as c:
        dump = "\n".join(c.iterdump()).encode()
    raw = b"".join(p.read_bytes() for p in db.parent.glob("ks.db*"))
    for blob in (cmdline, environ, log, dump, raw):
        assert PW not in blob
    # every process on the machine: nothing carries the password in argv or environment
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            for name in ("cmdline", "environ"):
                with contextlib.suppress(OSError):
                    assert PW not in (proc / name).read_bytes(), f"{proc}/{name}"


def test_wrong_password_starts_nothing(env: tuple[Path, Path]) -> None:
    db, sockdir = env
    r = cli(
        db,
        "disk",
        "serve",
        "web1-0",
        "--socket",
        str(sockdir / "x.sock"),
        secret=b"not-the-password\n",
        code=77,
    )
    assert "authentication failed" in r.stderr
    assert not (sockdir / "x.sock").exists()
    assert json.loads(cli(db, "user", "list", "--json").stdout)[0]["failed_attempts"] == 1


def test_passwd_rekeys_the_disk(env: tuple[Path, Path]) -> None:
    db, sockdir = env
    cli(
        db,
        "user",
        "passwd",
        "alice",
        "--pbkdf-iterations",
        "1000",
        secret=PW + b"\n" + NEW_PW + b"\n" + NEW_PW + b"\n",
    )
    image = json.loads(cli(db, "disk", "list", "--json").stdout)[0]["path"]
    key = sockdir / "k"
    key.write_bytes(NEW_PW)
    subprocess.run(
        ["cryptsetup", "luksOpen", "--test-passphrase", "--key-file", str(key), image],
        check=True,
        timeout=60,
    )
    key.write_bytes(PW)
    assert (
        subprocess.run(
            ["cryptsetup", "luksOpen", "--test-passphrase", "--key-file", str(key), image],
            timeout=60,
            check=False,
        ).returncode
        != 0
    )
    info = serve(db, sockdir, secret=NEW_PW)
    assert info["pid"] > 0


def test_passwd_refused_while_served_keeps_both_in_step(env: tuple[Path, Path]) -> None:
    db, sockdir = env
    serve(db, sockdir)
    r = cli(
        db,
        "user",
        "passwd",
        "alice",
        "--pbkdf-iterations",
        "1000",
        secret=PW + b"\n" + NEW_PW + b"\n" + NEW_PW + b"\n",
        code=1,
    )
    assert "not re-keyed" in r.stderr and "password not changed" in r.stderr
    cli(db, "disk", "stop", "web1-0")
    serve(db, sockdir)  # the old password still opens both the keystore and the keyslot


def test_stop_of_dead_server_cleans_record(env: tuple[Path, Path]) -> None:
    db, sockdir = env
    info = serve(db, sockdir)
    os.kill(info["pid"], 9)
    deadline = time.monotonic() + 10
    while not _is_zombie(info["pid"]) and Path(f"/proc/{info['pid']}").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "stale" in cli(db, "disk", "list").stdout
    assert "was not running" in cli(db, "disk", "stop", "web1-0").stdout
    assert json.loads(cli(db, "disk", "list", "--json").stdout)[0]["server"] is None


def test_keyslot_mismatch_fails_cleanly_and_is_audited(env: tuple[Path, Path]) -> None:
    """The keystore accepts the password but the image's keyslot does not (changed behind
    vmshield's back): nbdkit refuses to start, the failure is audited, nothing leaks."""
    from nbd_plugin import luks

    db, sockdir = env
    image = json.loads(cli(db, "disk", "list", "--json").stdout)[0]["path"]
    luks.change_key(image, PW, NEW_PW, iterations=1000)
    r = cli(
        db,
        "disk",
        "serve",
        "web1-0",
        "--socket",
        str(sockdir / "m.sock"),
        secret=PW + b"\n",
        code=1,
    )
    assert "nbdkit failed to start" in r.stderr and PW.decode() not in r.stderr
    assert not serve_probe(sockdir / "m.sock")
    last = json.loads(cli(db, "audit", "--json").stdout)[-1]
    assert last["action"] == "disk.serve.failed" and last["detail"]["disk"] == "web1-0"
    assert PW not in (sockdir / "m.log").read_bytes()
    assert json.loads(cli(db, "disk", "list", "--json").stdout)[0]["server"] is None


def serve_probe(sock: Path) -> bool:
    from keystore.services.nbdproc import probe

    return probe(sock)
