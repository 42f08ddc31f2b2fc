"""The qemu hook attacked by another local user: it runs as root on hook.conf and the run
directory, so neither may be something that user could have written or planted files in."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator

import pytest

from keystore.services import hostdisk, unlock
from keystore.services.libvirt_hook import main
from keystore.services.nbdproc import HostFiles
from tests.support.libvirt import Keystore, hook_keystore, processes

NOBODY = 65534

pytestmark = [
    pytest.mark.skipif(shutil.which("keyctl") is None, reason="keyutils missing"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the hook runs as root; the attacker is not"),
]


@pytest.fixture
def ks() -> Iterator[Keystore]:
    with hook_keystore("vha") as k:
        yield k


def usb_only_domain(ks: Keystore) -> bytes:
    dev = ks.cli("libvirt", "devices", ks.vm, "--usb-slots", "1").stdout
    dev = dev[dev.index("<controller") :]  # no disks: only the usbgate is started
    return f"<domain type='qemu'><name>{ks.vm}</name><devices>{dev}</devices></domain>".encode()


def run_hook(ks: Keystore, xml: bytes, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([ks.vm, "prepare", "begin", "-"], config=ks.config, stdin=io.BytesIO(xml))
    return code, capsys.readouterr().err


def test_hook_conf_another_user_could_write_is_refused(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    """With hook.conf in their hands, a user picks root's run directory, keystore and
    usbgate address; the hook refuses such a file, and one in a directory they can write."""
    xml = usb_only_domain(ks)
    os.chown(ks.config, NOBODY, NOBODY)
    code, err = run_hook(ks, xml, capsys)
    assert code == 1 and err.count("\n") == 1
    assert "others could have written it" in err and str(ks.config) in err
    os.chown(ks.config, 0, 0)
    os.chmod(ks.config, 0o666)
    code, err = run_hook(ks, xml, capsys)
    assert code == 1 and "others could have written it" in err
    os.chmod(ks.config, 0o644)
    os.chmod(ks.base, 0o777)  # the file is root's, but whoever can write its directory swaps it
    code, err = run_hook(ks, xml, capsys)
    assert code == 1 and "others could have written it" in err
    assert processes(str(ks.base)) == []


def test_usbgate_files_are_not_opened_through_a_planted_symlink(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run directory another user made first (or can write): the hook truncated whatever
    their `VM-usbgate.log` symlink pointed at, as root. It must refuse that directory."""
    victim = ks.base / "victim"
    victim.write_text("root's precious file\n")
    ks.run_dir.mkdir(mode=0o777)
    os.chown(ks.run_dir, NOBODY, NOBODY)
    (ks.run_dir / f"{ks.vm}-usbgate.log").symlink_to(victim)
    code, err = run_hook(ks, usb_only_domain(ks), capsys)
    assert victim.read_text() == "root's precious file\n"
    assert code == 1 and err.count("\n") == 1
    assert f"belongs to uid {NOBODY}" in err
    assert processes(str(ks.base)) == []


def test_a_failed_start_of_another_domain_does_not_stop_the_running_one(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    """web1 runs as domain `web1` (found by name). A second domain `intruder` carrying the
    VM's uuid references the same sockets: its start fails ("already served"), and libvirt
    then runs `release end` for it, which stopped web1's disk server and usbgate under the
    running guest. Release stops only what that domain's own prepare started."""
    from keystore.services import nbdproc

    uuid = ks.cli("vm", "show", ks.vm, "--json").stdout.split('"uuid": "')[1].split('"')[0]
    ks.cli("disk", "enroll-host", ks.disk, "--password-file", str(ks.pwfile))
    dev = ks.cli("libvirt", "devices", ks.vm, "--usb-slots", "1").stdout
    web1 = f"<domain><name>{ks.vm}</name><devices>{dev}</devices></domain>".encode()
    intruder = (
        f"<domain><name>intruder</name><uuid>{uuid}</uuid><devices>{dev}</devices></domain>"
    ).encode()
    assert run_hook(ks, web1, capsys)[0] == 0
    sock = ks.run_dir / "nbd.sock"  # the host disk server's, web1-0 an export on it
    pids = processes(str(ks.base))
    code, err = run_hook(ks, intruder, capsys)
    assert code == 1 and "carries the uuid of VM web1 but not its name" in err
    code = main(["intruder", "release", "end", "-"], config=ks.config, stdin=io.BytesIO(intruder))
    err = capsys.readouterr().err
    assert code == 0 and "not started by domain intruder" in err
    assert nbdproc.probe(sock) and processes(str(ks.base)) == pids
    assert ks.disk in (hostdisk.exports(HostFiles(ks.run_dir)) or {})
    code = main([ks.vm, "release", "end", "-"], config=ks.config, stdin=io.BytesIO(web1))
    assert code == 0 and capsys.readouterr().err.startswith(f"vmshield: VM {ks.vm}: stopped ")
    assert hostdisk.exports(HostFiles(ks.run_dir)) == {}  # the server stays, serving nothing
    assert processes(str(ks.base)) == [hostdisk.ping(HostFiles(ks.run_dir))]


def test_host_key_in_a_directory_another_user_owns_is_refused(ks: Keystore) -> None:
    """enroll-host made the key inside another user's directory: they can remove or rename it
    at will (and a key they swapped in is refused only by its owner). Refused from the start."""
    theirs = ks.base / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(unlock.UnlockError, match="belongs to another user"):
        unlock.ensure_host_key(theirs / "host.key")
    assert not (theirs / "host.key").exists()
    with pytest.raises(unlock.UnlockError, match="belongs to another user"):
        unlock.read_host_key(theirs / "sub" / "host.key")


def test_a_database_password_never_lands_in_hook_conf(
    ks: Keystore, capsys: pytest.CaptureFixture[str]
) -> None:
    """install-hook wrote `db = postgresql://u:PASSWORD@...` into hook.conf, mode 0644, and
    echoed it: every local user could read the keystore's database password. Refused (with the
    password masked), and a hook.conf that holds one is refused too."""
    url = "postgresql://vmshield:hunter2secret@db.example/keystore"
    conf = ks.base / "other.conf"
    p = ks.cli("libvirt", "install-hook", "--db", url, "--config", str(conf),
               "--hooks-dir", str(ks.base / "hooks2"), code=1)  # fmt: skip
    assert "do not put the database password in the URL" in p.stderr
    assert "hunter2secret" not in p.stdout + p.stderr
    assert not conf.exists() and not (ks.base / "hooks2").exists()
    xml = usb_only_domain(ks)
    ks.config.write_text(ks.config.read_text().replace(f"db = {ks.db}", f"db = {url}"))
    code, err = run_hook(ks, xml, capsys)
    assert code == 1 and err.count("\n") == 1
    assert "do not put the database password" in err and "hunter2secret" not in err


def test_install_hook_refuses_a_python_another_user_can_replace(ks: Keystore) -> None:
    """`sudo ~alice/venv/bin/vmshield libvirt install-hook` wrote `#!~alice/venv/bin/python`
    into root's hook: alice swaps that interpreter and libvirtd runs her code as root."""
    import subprocess
    import sys
    import sysconfig

    from tests.support.nbd import ROOT

    theirs = ks.base / "alice-venv" / "bin"
    theirs.mkdir(parents=True)
    os.chown(theirs, NOBODY, NOBODY)
    (theirs / "python").symlink_to(os.path.realpath(sys.executable))
    hooks = ks.base / "hooks3"
    path = f"{ROOT}:{sysconfig.get_paths()['purelib']}"  # what its venv would have given
    r = subprocess.run(
        [str(theirs / "python"), "-c", "from keystore.cli import main; main()", "libvirt",
         "install-hook", "--hooks-dir", str(hooks), "--config", str(ks.base / "h3.conf")],
        env={**ks.env(), "PYTHONPATH": path}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "another user owns or can write it" in r.stderr and r.stderr.count("\n") == 1
    assert not (hooks / "vmshield").exists()


def test_a_disk_path_cannot_add_elements_to_the_domain(ks: Keystore) -> None:
    """`libvirt devices` put the image path into an XML comment as it is: a path holding
    `-->` ended the comment and the rest became elements of the admin's domain (here a
    <hostdev>), and any path with `--` made the XML invalid."""
    import xml.etree.ElementTree as ET

    evil = ks.base / "x--><hostdev mode='subsystem' type='pci'><"  # + "/hostdev><!--.img"
    evil.mkdir()
    ks.cli("disk", "create", ks.vm, "--size", "8M", "--pbkdf-iterations", "1000",
           "--password-file", str(ks.pwfile), "--path", str(evil / "hostdev><!--.img"))  # fmt: skip
    dev = ks.cli("libvirt", "devices", ks.vm).stdout
    root = ET.fromstring(f"<devices>{dev}</devices>")
    assert root.find("hostdev") is None and len(root.findall("disk")) == 2
    assert "hostdev" in dev  # the path is still shown, inside its comment
