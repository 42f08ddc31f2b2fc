"""Issue 22, keystore side: `vmshield disk serve/stop/list` drive ONE host disk server.

Real parts: the `vmshield` CLI, the host nbdkit running the plugin in host mode, libnbd's
nbdinfo, qemu-io and a QEMU (TCG, stopped before it runs code) as NBD clients, the kernel
keyring-free host key. Every disk is an export of the one server; `--isolated` keeps a server
of its own; stop refuses while connected; refusals, adds and removes are audited; after a
SIGKILL of the server `disk serve --restore` brings back what a host key opened and names
what needs its owner.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystore.services import hostdisk, nbdproc, snippets
from keystore.services.nbdproc import Endpoint, HostFiles
from tests.support.libvirt import Keystore, hook_keystore


@pytest.fixture
def ks() -> Iterator[Keystore]:
    """VM web1 (disk web1-0) and VM web2 (disk web2-0) of alice."""
    with hook_keystore("vhs") as k:
        k.cli("vm", "add", "web2", "--owner", "alice")
        k.cli("disk", "create", "web2", "--size", "64M", "--pbkdf-iterations", "1000",
              "--password-file", str(k.pwfile))  # fmt: skip
        yield k


def serve(ks: Keystore, disk: str, *extra: str, code: int = 0) -> dict[str, Any]:
    p = ks.cli("disk", "serve", disk, "--run-dir", str(ks.run_dir), "--password-file",
               str(ks.pwfile), "--json", *extra, code=code)  # fmt: skip
    return json.loads(p.stdout) if code == 0 else {"stderr": p.stderr}


def listing(ks: Keystore) -> dict[str, Any]:
    return {d["name"]: d for d in json.loads(ks.cli("disk", "list", "--json").stdout)}


def actions(ks: Keystore, limit: int = 40) -> list[tuple[str, dict[str, Any]]]:
    return [(str(r["action"]), r["detail"]) for r in ks.audit(limit)]  # type: ignore[misc]


def nbdinfo(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def qemu(sock: Path, export: str, vm_uuid: str) -> Iterator[subprocess.Popen[str]]:
    """A QEMU of VM `vm_uuid` whose drive is `export` on `sock` (stopped before it runs code)."""
    argv = [
        "qemu-system-x86_64", "-uuid", vm_uuid, "-name", "guest=t", "-S", "-accel", "tcg",
        "-machine", "none", "-nodefaults", "-display", "none", "-monitor", "none",
        "-blockdev", f"driver=nbd,server.type=unix,server.path={sock},export={export},"
        "node-name=d0",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def wait_for(what: str, check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_endpoint_is_recorded_as_the_export_uri() -> None:
    ep = Endpoint(Path("/run/vmshield/nbd.sock"), "web1-0")
    assert ep.recorded() == "nbd+unix:///web1-0?socket=/run/vmshield/nbd.sock"
    assert ep.recorded() == snippets.nbd_uri("/run/vmshield/nbd.sock", "web1-0")
    assert Endpoint.parse(ep.recorded()) == ep
    own = Endpoint(Path("/run/vmshield/web1-0.sock"))
    assert Endpoint.parse(own.recorded()) == own and own.recorded() == "/run/vmshield/web1-0.sock"
    blockdev = snippets.qemu_blockdev("/r/nbd.sock", "n", readonly=False, export="web1-0")
    assert "server.path=/r/nbd.sock,export=web1-0,reconnect-delay=10" in blockdev


def test_two_disks_are_two_exports_of_one_server(ks: Keystore) -> None:
    a = serve(ks, "web1-0")
    b = serve(ks, "web2-0")
    host = HostFiles(ks.run_dir)
    assert a["pid"] == b["pid"] == hostdisk.ping(host)  # one process serves both
    assert a["socket"] == b["socket"] == str(host.socket)
    assert a["uri"] == f"nbd+unix:///web1-0?socket={host.socket}"
    assert "export=web1-0" in a["qemu_blockdev"] and "reconnect-delay=" in a["qemu_blockdev"]
    assert "<reconnect delay=" in a["libvirt_xml"] and 'name="web1-0"' in a["libvirt_xml"]
    assert nbdinfo(a["uri"]).stdout.strip() == str(64 << 20)
    assert nbdinfo(b["uri"]).stdout.strip() == str(64 << 20)
    rows = listing(ks)
    assert {n: rows[n]["server"]["export"] for n in rows} == {"web1-0": "web1-0",
                                                              "web2-0": "web2-0"}  # fmt: skip
    assert all(rows[n]["server"]["alive"] for n in rows)
    status = json.loads(ks.cli("status", "--json").stdout)
    assert sorted(d["disk"] for d in status["disks"]) == ["web1-0", "web2-0"]
    assert all(d["started_by"].startswith("CLI (") for d in status["disks"])
    assert {d["pid"] for d in status["disks"]} == {a["pid"]}
    added = [d for act, d in actions(ks) if act == "disk.export.add"]
    assert [d["export"] for d in added] == ["web1-0", "web2-0"]
    assert added[0]["uri"] == a["uri"] and added[0]["bind"] is None
    # serving it again is refused while it is an export
    assert "already served" in serve(ks, "web1-0", code=1)["stderr"]
    # a per-disk server stays available beside it
    ks.cli("disk", "stop", "web2-0")
    own = json.loads(ks.cli("disk", "serve", "web2-0", "--isolated", "--socket",
                            str(ks.base / "own.sock"), "--password-file", str(ks.pwfile),
                            "--json").stdout)  # fmt: skip
    assert own["pid"] != a["pid"] and own["export"] is None
    assert own["uri"] == f"nbd+unix:///?socket={ks.base / 'own.sock'}"
    assert nbdinfo(own["uri"]).stdout.strip() == str(64 << 20)
    ks.cli("disk", "stop", "web2-0")
    assert nbdproc.is_host_server(a["pid"], host)  # the other disk's server did not move


def test_stop_refuses_while_connected_and_removes_only_that_export(ks: Keystore) -> None:
    a = serve(ks, "web1-0")
    b = serve(ks, "web2-0")
    client = subprocess.Popen(["qemu-io", "-f", "raw", a["uri"], "-c", "sleep 20000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        host = HostFiles(ks.run_dir)
        wait_for("qemu-io connected", lambda: (hostdisk.exports(host) or {})["web1-0"].clients)
        r = ks.cli("disk", "stop", "web1-0", code=75)
        assert f"NBD client pid {client.pid}: qemu-io" in r.stderr and "--force" in r.stderr
        assert r.stderr.count("\n") == 1
        status = {d["disk"]: d for d in json.loads(ks.cli("status", "--json").stdout)["disks"]}
        assert [c["pid"] for c in status["web1-0"]["clients"]] == [client.pid]
        assert status["web2-0"]["clients"] == []
        # the other export is not disturbed
        assert "stopped export of web2-0" in ks.cli("disk", "stop", "web2-0").stdout
        assert set(hostdisk.exports(host) or {}) == {"web1-0"}
        assert "stopped export of web1-0" in ks.cli("disk", "stop", "web1-0", "--force").stdout
        assert hostdisk.exports(host) == {}
        assert hostdisk.ping(host) == a["pid"] == b["pid"]  # the server stays up
    finally:
        client.kill()
        client.wait()
    removed = [d for act, d in actions(ks) if act == "disk.export.remove"]
    assert [(d["export"], d["force"]) for d in removed] == [("web2-0", False), ("web1-0", True)]
    assert all(listing(ks)[n]["server"] is None for n in ("web1-0", "web2-0"))


def test_bound_export_refuses_other_clients_and_the_refusal_is_audited(ks: Keystore) -> None:
    a = serve(ks, "web1-0", "--bind-vm")
    b = serve(ks, "web2-0", "--bind-vm")
    uuid1, uuid2 = a["bound_to_vm"], b["bound_to_vm"]
    r = nbdinfo(a["uri"])
    assert r.returncode != 0 and "export-size" not in r.stdout
    sock = Path(a["socket"])
    # VM web2's QEMU pointed at web1's export: refused; its own export opens
    with qemu(sock, "web1-0", uuid2) as wrong:
        assert wrong.wait(timeout=60) != 0
    with qemu(sock, "web2-0", uuid2) as right:
        host = HostFiles(ks.run_dir)
        wait_for("web2's QEMU connected", lambda: (hostdisk.exports(host) or {})["web2-0"].clients)
        assert right.poll() is None
    ks.cli("disk", "list")  # collects the server's refusals into the audit trail
    refused = [(r["vm"], r["detail"]) for r in ks.audit(40)
               if r["action"] == "disk.export.refused"]  # fmt: skip
    assert len(refused) >= 2 and {vm for vm, _ in refused} == {"web1"}
    reasons = " | ".join(str(d["reason"]) for _, d in refused)
    assert "(nbdinfo) carries no -uuid" in reasons
    assert f"carries -uuid {uuid2}, not VM {uuid1}'s QEMU" in reasons
    assert all(d["export"] == "web1-0" for _, d in refused)
    before = len(refused)
    ks.cli("disk", "list")  # audited once, not at every look
    again = [r for r in ks.audit(60) if r["action"] == "disk.export.refused"]
    assert len(again) == before


def test_restore_after_a_kill_brings_back_host_key_disks_and_names_the_others(
    ks: Keystore,
) -> None:
    ks.cli("vm", "set", "web2", "--unlock", "host-key")
    ks.cli("disk", "enroll-host", "web2-0", "--password-file", str(ks.pwfile))
    a = serve(ks, "web1-0", "--bind-vm")  # the owner's password
    b = serve(ks, "web2-0", "--unattended", "--bind-vm")  # the host key
    host = HostFiles(ks.run_dir)
    old = a["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for("the server is gone", lambda: not nbdproc.is_host_server(old, host))
    rows = listing(ks)
    assert not rows["web1-0"]["server"]["alive"] and not rows["web2-0"]["server"]["alive"]

    r = ks.cli("disk", "serve", "--restore", "--run-dir", str(ks.run_dir), "--json")
    out = json.loads(r.stdout)
    assert out["restored"] == {"web2-0": "host-key"}
    assert "vmshield vm unlock web1" in out["owner"]["web1-0"]
    new = hostdisk.ping(host)
    assert new is not None and new != old
    exports = hostdisk.exports(host) or {}
    assert set(exports) == {"web2-0"}
    assert exports["web2-0"].bind is not None and exports["web2-0"].bind.uuid == b["bound_to_vm"]
    assert nbdinfo(b["uri"]).returncode != 0  # still bound to web2's QEMU only
    rows = listing(ks)
    assert rows["web2-0"]["server"]["alive"] and rows["web2-0"]["server"]["pid"] == new
    assert not rows["web1-0"]["server"]["alive"]
    restored = [d for act, d in actions(ks) if act == "disk.export.restore"]
    assert restored[-1]["restored"] == {"web2-0": "host-key"} and restored[-1]["server_pid"] == new
    # run again: nothing to do twice
    again = json.loads(ks.cli("disk", "serve", "--restore", "--run-dir", str(ks.run_dir),
                              "--json").stdout)  # fmt: skip
    assert again["restored"] == {} and again["served"] == ["web2-0"]
    # the owner serves web1-0 again by hand: the record is replaced
    assert serve(ks, "web1-0")["pid"] == new


def test_serve_that_starts_the_server_restores_the_others(ks: Keystore) -> None:
    ks.cli("vm", "set", "web2", "--unlock", "host-key")
    ks.cli("disk", "enroll-host", "web2-0", "--password-file", str(ks.pwfile))
    first = serve(ks, "web2-0", "--unattended")
    serve(ks, "web1-0")
    os.kill(first["pid"], signal.SIGKILL)
    host = HostFiles(ks.run_dir)
    wait_for("the server is gone", lambda: hostdisk.ping(host) is None)
    p = ks.cli("disk", "serve", "web1-0", "--run-dir", str(ks.run_dir), "--password-file",
               str(ks.pwfile))  # fmt: skip
    assert "host disk server started: restored web2-0 (host-key)" in p.stderr
    assert set(hostdisk.exports(host) or {}) == {"web1-0", "web2-0"}
    restore = [d for act, d in actions(ks) if act == "disk.export.restore"][-1]
    assert restore["restored"] == {"web2-0": "host-key"} and restore["served"] == ["web1-0"]


def test_restore_drops_records_from_before_this_boot(ks: Keystore) -> None:
    a = serve(ks, "web1-0")
    os.kill(a["pid"], signal.SIGKILL)
    host = HostFiles(ks.run_dir)
    wait_for("the server is gone", lambda: hostdisk.ping(host) is None)
    with sqlite3.connect(ks.db) as db:
        db.execute("UPDATE servers SET started = '2000-01-01T00:00:00+00:00'")
    out = json.loads(ks.cli("disk", "serve", "--restore", "--run-dir", str(ks.run_dir),
                            "--json").stdout)  # fmt: skip
    assert out["dropped"] == ["web1-0"] and out["owner"] == {} and out["restored"] == {}
    assert listing(ks)["web1-0"]["server"] is None
    assert hostdisk.exports(host) == {}


def test_bad_input_is_one_line(ks: Keystore) -> None:
    r = ks.cli("disk", "serve", "--restore", "web1-0", code=2)
    assert "--restore takes no DISK" in r.stderr
    r = ks.cli("disk", "serve", code=2)
    assert "missing argument DISK" in r.stderr
    # a wrong password starts no server at all
    bad = ks.base / "bad.pw"
    bad.write_bytes(b"not the password")
    r = ks.cli("disk", "serve", "web1-0", "--run-dir", str(ks.run_dir), "--password-file",
               str(bad), code=77)  # fmt: skip
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert hostdisk.ping(HostFiles(ks.run_dir)) is None
