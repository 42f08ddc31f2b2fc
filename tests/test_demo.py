"""`scripts/demo` runs green end to end, prints what it proves, and leaves nothing running."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

needs_qemu = pytest.mark.skipif(
    not (shutil.which("qemu-system-x86_64") and shutil.which("nbdkit")),
    reason="needs qemu-system-x86_64 and nbdkit",
)

# One line per step's key result (the demo prints ✘ instead of ✔ when a check fails).
EXPECTED = [
    "✔ keystore has user alice, VM demo and disk demo-0 (state ready)",
    "✔ the guest wrote the marker through the plugin and powered off",
    "✔ the marker is absent from the ciphertext file",
    "✔ wrong password refused and audited: ",
    "✔ nbdkit with the plugin, given the wrong passphrase directly, stops before listening",
    "✔ the decrypted view holds the marker",
    "✔ allowed by rule 'allow 0781:5567': QEMU attached it",
    "✔ `vmshield usb block` detached it (QMP attached=false)",
    "  latency: usbgate, from seeing the new rule to device_disconnect: ",
    "✔ disk demo-0 destroyed; certificate ",
    "✔ the ciphertext file is gone",
    "✔ the hash chain verifies",
    "✔ vmshield demo passed: all ",
]
# The libvirt step runs where a private libvirtd can (scripts.lab.libvirtd.available).
EXPECTED_LIBVIRT = [
    "✔ without an unlock `virsh start` fails with the hook's reason; nothing was started",
    "✔ the libvirt-started guest wrote the marker",
    "✔ marker absent from the ciphertext, present in the decrypted view",
    "✔ after unenroll-host the start fails again (unlock VM first)",
    "  virsh start -> first disk read, median of 3: with the hook ",
    "the hook itself took ",
]


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    """Short (unix socket paths), and not yet existing: the demo creates it."""
    parent = Path(tempfile.mkdtemp(prefix="vmsdemo", dir="/tmp"))
    try:
        yield parent / "d"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.slow
@pytest.mark.qemu
@needs_qemu
def test_demo_runs_green_and_leaves_nothing_running(demo_dir: Path) -> None:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "demo"), "--dir", str(demo_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,  # ~110 s on an idle machine, with the libvirt step
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "✘" not in out, out
    from scripts.lab.libvirtd import available

    for line in EXPECTED + (EXPECTED_LIBVIRT if available() is None else []):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert processes_mentioning(str(demo_dir)) == []
    # Everything it kept is in the directory it named; the destroyed image is gone.
    assert (demo_dir / "keystore.db").is_file()
    assert not (demo_dir / "disks" / "demo-0.img").exists()
    assert (demo_dir / "disks" / "demo-0.img.erase-certificate.json").is_file()


def test_demo_refuses_to_wipe_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not the demo's\n")
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "scripts.lab.demo",
         "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "not a demo directory" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "not the demo's\n"
