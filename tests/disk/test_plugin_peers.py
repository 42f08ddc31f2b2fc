"""#20 B2/B3: a server bound to a VM (`bind=UUID`) opens connections of that VM's QEMU only.

Real nbdkit, real nbdinfo, real QEMU (TCG, `-S`: it connects its NBD drive at start and
runs no guest). The clients differ only in what /proc says about them.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nbd import (
    luks1_image,
    qemu_client,
    read_at,
    run_nbdkit_expect_failure,
    serve_plugin,
)

SIZE = 1 << 20
VM = str(uuid.UUID("5d1c4a52-8a43-4f0e-9a53-1c0ffee00001"))
OTHER = str(uuid.UUID("5d1c4a52-8a43-4f0e-9a53-1c0ffee00002"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return luks1_image(tmp_path, SIZE)


def server_log(sock: str) -> str:
    return Path(sock + ".err").read_text(errors="replace")


def wait_for(pred: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def refused_line(sock: str, pid: int) -> str:
    lines = [ln for ln in server_log(sock).splitlines() if f"refused a client: pid {pid} " in ln]
    return lines[0] if lines else ""


def test_unbound_server_serves_any_client_as_before(
    image: Path, keyfile: Path, sockdir: Path
) -> None:
    with serve_plugin(image, keyfile, sockdir) as sock:
        assert len(read_at(sock, 4096)) == 4096
        r = subprocess.run(["nbdinfo", f"nbd+unix:///?socket={sock}"], capture_output=True)
        assert r.returncode == 0, r.stderr
        assert "refused" not in server_log(sock)


def test_bound_server_refuses_nbdinfo_and_this_process(
    image: Path, keyfile: Path, sockdir: Path
) -> None:
    with serve_plugin(image, keyfile, sockdir, f"bind={VM}") as sock:
        r = subprocess.Popen(
            ["nbdinfo", f"nbd+unix:///?socket={sock}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, _ = r.communicate(timeout=30)
        assert r.returncode != 0
        assert "4096" not in out
        line = refused_line(sock, r.pid)
        assert f"(nbdinfo) carries no -uuid, not VM {VM}'s QEMU" in line, server_log(sock)
        # a libnbd client in this very process (pytest: python, no -uuid) is refused too
        import nbd

        with pytest.raises(nbd.Error, match="handshake"):
            read_at(sock, 4096)
        assert refused_line(sock, os.getpid())
        assert "connected (" not in server_log(sock)  # nothing was ever opened


def test_bound_server_refuses_another_vms_qemu_and_opens_its_own(
    image: Path, keyfile: Path, sockdir: Path
) -> None:
    with serve_plugin(image, keyfile, sockdir, f"bind={VM}") as sock:
        with qemu_client(sock, OTHER) as other:
            assert other.wait(timeout=60) != 0
            assert f"carries -uuid {OTHER}, not VM {VM}'s QEMU" in refused_line(sock, other.pid)
            assert "connected (" not in server_log(sock)
        with qemu_client(sock, VM) as own:
            assert wait_for(lambda: "client #1 connected (read-write)" in server_log(sock))
            time.sleep(0.3)
            assert own.poll() is None, own.stderr.read() if own.stderr else ""
            assert not refused_line(sock, own.pid)


def test_config_errors_are_one_line(image: Path, keyfile: Path) -> None:
    from tests.support.nbd import plugin_args

    for extra, words in (
        ("bind=not-a-uuid", "bind=not-a-uuid: use the uuid of the VM"),
        ("bind_domain=web", "bind_domain= needs bind=UUID"),
    ):
        r = run_nbdkit_expect_failure(plugin_args(image, keyfile, extra))
        assert r.returncode != 0
        assert words in r.stderr
        assert "Traceback" not in r.stderr


@pytest.fixture
def scopes() -> Iterator[Path]:
    """A private cgroup directory (name=systemd hierarchy) to hold libvirt-like machine scopes:
    the way libvirt places each QEMU, which a process cannot leave without root."""
    root = Path("/sys/fs/cgroup/systemd") / f"vmshield-test-{os.getpid()}"
    root.mkdir()
    try:
        yield root
    finally:
        for scope in root.iterdir():
            if scope.is_dir():
                scope.rmdir()
        root.rmdir()


def scope(root: Path, machine: str) -> Path:
    path = root / ("machine-" + machine.replace("-", "\\x2d") + ".scope")
    path.mkdir()
    return path


def test_bound_domain_refuses_its_uuid_from_another_domains_scope(
    image: Path, keyfile: Path, sockdir: Path, scopes: Path
) -> None:
    """A QEMU of another libvirt domain that forges the VM's -uuid is still in its own
    domain's machine scope: refused. The domain's own QEMU (its scope) is opened."""
    with serve_plugin(image, keyfile, sockdir, f"bind={VM}", "bind_domain=web.1") as sock:
        with qemu_client(sock, VM, scope(scopes, "qemu-7-other")) as forged:
            assert forged.wait(timeout=60) != 0
            line = refused_line(sock, forged.pid)
            assert "in libvirt machine qemu-7-other): another libvirt domain's process" in line
        with qemu_client(sock, VM, scope(scopes, "qemu-8-web.1")) as own:
            assert wait_for(lambda: "client #1 connected (read-write)" in server_log(sock))
            assert own.poll() is None
            assert not refused_line(sock, own.pid)


def test_identity_parsing() -> None:
    from nbd_plugin.serve import peers

    assert peers.machine_name(3, "web") == "qemu-3-web"
    assert peers.machine_name(3, "-a..b c_d-") == "qemu-3-a.bcd"  # as libvirt writes it
    assert len(peers.machine_name(12, "x" * 100)) == 64
    cg = "9:name=systemd:/machine.slice/machine-qemu\\x2d2\\x2dweb\\x2d0.scope/libvirt\n0::/\n"
    assert peers.machine_scope(cg) == ("qemu-2-web-0", 2)
    assert peers.machine_scope("0::/user.slice/session-1.scope\n") is None
    assert peers.qemu_uuid([b"qemu", b"-uuid", VM.upper().encode()]) == VM
    assert peers.qemu_uuid([b"qemu", b"-uuid", VM.encode(), b"-uuid", OTHER.encode()]) is None
    assert peers.qemu_uuid([b"qemu", b"-uuid"]) is None
