"""The systemd units in scripts/systemd: they verify, and the disk unit's ExecStart, with
systemd's substitutions done by hand, really serves the disk from a credential file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from keystore.services import nbdproc
from nbd_plugin import luks
from tests.support import ROOT

UNITS = ROOT / "scripts" / "systemd"
PW = b"unit-test-passphrase"


def exec_start(unit: Path) -> str:
    text = unit.read_text().replace("\\\n", " ")
    lines = [ln for ln in text.splitlines() if ln.startswith("ExecStart=") and ln != "ExecStart="]
    assert len(lines) == 1
    return lines[0].removeprefix("ExecStart=")


def test_disk_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "vmshield-disk@web1-0.service"
    shutil.copy(UNITS / "vmshield-disk@.service", tmp_path / "vmshield-disk@.service")
    p = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr


def test_units_never_put_secrets_in_argv_or_environment() -> None:
    for unit in UNITS.iterdir():
        text = unit.read_text()
        for m in re.finditer(r"passphrase=(\S)", text):
            assert m.group(1) in "+-", f"{unit.name}: literal passphrase= in a command line"
        assert not re.search(r"^Environment=\w*(PASS|SECRET|KEY)\w*=", text, re.M), unit.name


def test_disk_unit_exec_start_serves_from_credential(tmp_path: Path, sockdir: Path) -> None:
    image = tmp_path / "web1-0.img"
    luks.create_image(str(image), 4 << 20, PW, iterations=1000)
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    (creds / "passphrase").write_bytes(PW)
    sock = sockdir / "web1-0.sock"
    line = exec_start(UNITS / "vmshield-disk@.service")
    line = (
        line.replace("/run/vmshield/%i.sock", str(sock))
        .replace("%d", str(creds))
        .replace("${VMSHIELD_PLUGIN}", str(nbdproc.plugin_path()))
        .replace("${VMSHIELD_IMAGE}", str(image))
    )
    assert "%" not in line and "${" not in line
    argv = line.split()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 60
        while not nbdproc.probe(sock):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        import nbd

        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        assert h.get_size() == 4 << 20
        h.shutdown()
        assert PW not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_ask_password_dropin_pipes_passphrase_without_newline(
    tmp_path: Path, sockdir: Path
) -> None:
    image = tmp_path / "web1-0.img"
    luks.create_image(str(image), 4 << 20, PW, iterations=1000)
    # a stand-in for systemd-ask-password: prints the answer and a newline, as the real one
    fake = tmp_path / "bin"
    fake.mkdir()
    ask = fake / "systemd-ask-password"
    ask.write_text(f"#!/bin/sh\nprintf '%s\\n' '{PW.decode()}'\n")
    ask.chmod(0o755)
    line = exec_start(UNITS / "vmshield-disk-ask-password.conf")
    assert line.startswith("/bin/sh -c '") and line.endswith("'")
    script = line[len("/bin/sh -c '") : -1].replace("\\\\n", "\\n")  # systemd's C unescaping
    sock = sockdir / "web1-0.sock"
    script = script.replace("/run/vmshield/%i.sock", str(sock)).replace("%i", "web1-0")
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "VMSHIELD_PLUGIN": str(nbdproc.plugin_path()),
        "VMSHIELD_IMAGE": str(image),
    }
    proc = subprocess.Popen(
        ["/bin/sh", "-c", script],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not nbdproc.probe(sock):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_host_unit_verifies_and_its_exec_start_runs_the_host_server(
    tmp_path: Path, sockdir: Path
) -> None:
    from keystore.services import hostdisk

    unit = UNITS / "vmshield-nbd.service"
    shutil.copy(unit, tmp_path / unit.name)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit.name)],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    text = unit.read_text()
    assert "\nType=forking\n" in text and "\nPIDFile=/run/vmshield/nbd.pid\n" in text
    assert "\nMemorySwapMax=0\n" in text and "\nLimitCORE=0\n" in text
    # a disk that cannot come back must not fail the unit ("-")
    assert "\nExecStartPost=-/usr/bin/vmshield disk serve --restore\n" in text
    line = exec_start(unit).replace("/run/vmshield", str(sockdir))
    line = line.replace("${VMSHIELD_PLUGIN}", str(nbdproc.plugin_path()))
    assert "%" not in line and "${" not in line
    # Type=forking: the command returns once the server runs (control socket bound)
    subprocess.run(line.split(), env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                   timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    host = nbdproc.HostFiles(sockdir)
    pid = nbdproc.read_pid(host.pidfile)
    try:
        assert pid is not None and hostdisk.ping(host) == pid
        assert hostdisk.ensure(host) == (pid, False)  # `disk serve` uses it, starts no other
        assert nbdproc.probe(host.socket) and hostdisk.exports(host) == {}
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
