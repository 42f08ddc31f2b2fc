"""Issue 20 B8: a disk's run-directory files never collide with a VM's or another disk's.

Disk DISK uses RUN/DISK.sock, .pid, .log and .lease.log; VM web uses RUN/web-usb.sock
(usbgate's listener), RUN/web-usbN.sock (usb-redir slots) and RUN/web-usbgate.pid/.log. A
disk named after one of those took them over; such names are refused, one per collision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner, Result

from keystore.auth import AuthPolicy
from keystore.cli import main
from keystore.errors import KeystoreError
from keystore.services import nbdproc, serve
from keystore.services.libvirt_xml import usb_socket, usbgate_files
from keystore.services.store import Keystore
from keystore.sqlite import repository as sqlite_repo
from nbd_plugin import luks
from tests.support.nbd import write_secret

PW = b"s3cret-horse-battery"
FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
RUN = Path("/run/vmshield")

#: name -> the VM web's (or disk web-0's) file it would have taken
COLLISIONS = {
    "web-usb": "web-usb.sock",  # usbgate's listener (hook.conf's default usb_listen)
    "web-usb0": usb_socket(RUN, "web", 0).name,
    "web-usbgate": usbgate_files(RUN, "web")[0].name,
    "web-0.lease": "web-0.lease.log",  # disk web-0's lease log, as web-0.lease's .log
}


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "ks.db"
    monkeypatch.setenv("VMSHIELD_DB", str(path))
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    write_secret(tmp_path / "pw", PW)
    vms("init")
    vms("user", "add", "alice", "--password-file", str(tmp_path / "pw"))
    vms("vm", "add", "web", "--owner", "alice")
    return path


def vms(*args: str, code: int = 0) -> Result:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r


@pytest.mark.parametrize("name", sorted(COLLISIONS))
def test_a_disk_named_like_a_vms_run_file_is_refused(db: Path, name: str) -> None:
    r = vms("disk", "create", "web", "--name", name, "--size", "1M", "--format", "luks1",
            "--pbkdf-iterations", "1000", "--password-file", str(db.parent / "pw"),
            code=1)  # fmt: skip
    assert r.output.count("\n") == 1 and "reserved" in r.output, r.output
    assert json.loads(vms("disk", "list", "--json").output) == []
    assert not (db.parent / "disks" / f"{name}.img").exists()


def test_a_recorded_disk_with_such_a_name_is_not_served(db: Path, tmp_path: Path) -> None:
    """A record made before the rule (or by another tool) is refused before nbdkit starts."""
    img = tmp_path / "old.img"
    luks.create_image(str(img), 1 << 20, PW, iterations=1000)
    store = Keystore(db)
    store.run(lambda r: r.add_disk("web", "web-usb0", str(img), fmt="luks1",
                                   cipher="aes-xts-plain64", size=1 << 20, actor="t"))  # fmt: skip
    disk = store.run(lambda r: r.get_disk("web-usb0"))
    files = nbdproc.ServerFiles(tmp_path / "web-usb0.sock")
    with pytest.raises(KeystoreError, match="reserved"):
        serve.serve_recorded(store, disk, PW, files, readonly=False, who="t")
    assert not files.pidfile.exists() and not files.socket.exists()
