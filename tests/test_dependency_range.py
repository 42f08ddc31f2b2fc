"""Both ends of the ranges pyproject.toml claims: the floors and today's newest releases.

The lock (scripts/requirements.lock) is what CI and users get; these tests check the claim made
to anyone who installs with pip instead: every runtime dependency at its lower bound, and every
one at the newest release the index serves. Each builds a throwaway venv from the Python nbdkit
embeds and runs the tests that exercise the dependencies directly (the cipher paths through
cryptography and numba, argon2 verifiers, the SQLite keystore, the usbredir codec) in it.
Needs the package index (scripts/setup does too).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
EXERCISED = [
    "tests/disk/test_xts.py",
    "tests/disk/test_ciphers.py",
    "tests/disk/test_xts_jit.py",
    "tests/disk/erase/test_erase_engine.py",
    "tests/keystore/test_keystore_sqlite.py",
    "tests/keystore/test_services.py",
    "tests/usbgate/test_usbgate_codec.py",
]
TEST_TOOLS = ["pytest", "pytest-timeout", "hypothesis"]


def runtime_requirements() -> list[str]:
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def floors() -> list[str]:
    """Each runtime dependency pinned to its lower bound (every one must have one)."""
    pinned = []
    for req in runtime_requirements():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)(,.*)?", req)
        assert m, f"{req!r}: a runtime dependency needs a tested lower bound (>=)"
        pinned.append(f"{m.group(1)}=={m.group(2)}")
    return pinned


def venv_with(tmp: Path, requirements: list[str]) -> Path:
    python = tmp / "venv" / "bin" / "python"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(tmp / "venv")], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager"]
    subprocess.run([*pip, *requirements, *TEST_TOOLS], check=True, timeout=900)
    return python


def run_exercised(python: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *EXERCISED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def installed(python: Path, name: str) -> str:
    code = f"from importlib.metadata import version; print(version({name!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("end", ["floor", "newest"])
def test_dependency_range_end(end: str, tmp_path: Path) -> None:
    requirements = floors() if end == "floor" else runtime_requirements()
    python = venv_with(tmp_path, requirements)
    if end == "floor":  # the venv really holds the floors, not something newer
        for pin in requirements:
            name, version = pin.split("==")
            assert Version(installed(python, name)) == Version(version), pin
    result = run_exercised(python)
    assert result.returncode == 0, f"{end}: {result.stdout[-4000:]}{result.stderr[-2000:]}"
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]


def test_every_runtime_dependency_has_a_floor() -> None:
    assert len(floors()) == len(runtime_requirements())


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    lock = (ROOT / "scripts" / "requirements.lock").read_text()
    for pin in floors():
        name = pin.split("==")[0]
        m = re.search(
            rf"^{re.escape(name)}==(\S+) \\\n\s+--hash=sha256:[0-9a-f]{{64}}", lock, re.M | re.I
        )
        assert m, f"{name} is not pinned with a hash in scripts/requirements.lock"


def test_setup_refuses_a_venv_that_drifted_from_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(f"cryptography==0.0.1 \\\n    --hash=sha256:{'0' * 64}\n")
    check = [sys.executable, str(ROOT / "scripts" / "lockcheck.py"), str(lock)]
    r = subprocess.run(check, capture_output=True, text=True)
    assert r.returncode == 1 and "lock says 0.0.1" in r.stderr, r.stderr
    real = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "lockcheck.py"),
            str(ROOT / "scripts" / "requirements.lock"),
        ],
        capture_output=True,
        text=True,
    )
    stamp = Path(sys.prefix) / ".vmshield-installed"  # scripts/setup's: "lock ..." or "latest ..."
    if not stamp.is_file() or stamp.read_text().split()[0] == "lock":
        assert real.returncode == 0, real.stderr
        return
    # the canary's venv (scripts/setup --latest) holds the newest releases, which may be newer
    # than the lock: then every drift is named, each is real, and the check fails
    drifts = real.stderr.splitlines()
    for line in drifts:
        m = re.fullmatch(r"lockcheck: (\S+): (\S+) installed, lock says (\S+)", line)
        assert m and m[2] != m[3] and metadata.version(m[1]) == m[2], line
    assert real.returncode == (1 if drifts else 0), real.stderr


@pytest.mark.parametrize("args", [[], ["/nonexistent/requirements.lock"]])
def test_lockcheck_misused_says_one_line(args: list[str]) -> None:
    """No lock file named, or none there: one line and status 2, not a traceback."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "lockcheck.py"), *args],
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
