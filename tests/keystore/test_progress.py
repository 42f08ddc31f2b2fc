"""Progress with the time left for the long keystore commands (issue 26 item 9): `user
passwd` and `disk create` show each step on stderr when it is a terminal or with
--progress, and nothing extra otherwise (a pipe, a script)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

from keystore.services.progress import Progress
from tests.keystore.test_cli_disk_serve import PW, cli, env

__all__ = ["env"]  # the fixture, used by name

VMSHIELD = str(Path(sys.executable).parent / "vmshield")
NEW = b"another-password-2"


def test_each_step_says_its_place_and_the_time_left() -> None:
    now = [0.0]
    lines: list[str] = []
    steps = Progress(lines.append, 3, estimate=2.0, clock=lambda: now[0])
    steps.step("first")  # nothing done yet: the estimate for all three
    now[0] = 10.0
    steps.step("second")  # 10 s per step so far: longer than the estimate
    now[0] = 11.0
    steps.step("third", index=3)
    assert lines == ["[1/3] first (about 6 s left)", "[2/3] second (about 20 s left)",
                     "[3/3] third (about 6 s left)"]  # fmt: skip
    assert Progress(lines.append, 2).left() is None  # no estimate, nothing done: no ETA


def _steps(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[")]


def test_user_passwd_shows_each_disk_and_the_verifier(env: tuple[Path, Path]) -> None:
    db, _ = env
    quiet = cli(db, "user", "passwd", "alice", "--iter-time", "100",
                secret=PW + b"\n" + NEW + b"\n")  # fmt: skip
    assert _steps(quiet.stderr) == [] and "disk web1-0: re-keyed (1/1)" in quiet.stderr
    shown = cli(db, "user", "passwd", "alice", "--iter-time", "100", "--progress",
                secret=NEW + b"\n" + PW + b"\n")  # fmt: skip
    steps = _steps(shown.stderr)
    assert [s.split(" (about ")[0] for s in steps] == [
        "[1/2] disk web1-0: re-keying",
        "[2/2] the keystore verifier of alice",
    ], steps
    assert all(s.endswith(" left)") for s in steps), steps
    assert _steps(shown.stdout) == []


def test_disk_create_shows_its_steps_on_a_terminal_by_default(env: tuple[Path, Path]) -> None:
    db, _ = env
    args = [VMSHIELD, "disk", "create", "web1", "--size", "1M", "--iter-time", "100"]
    piped = cli(db, *args[1:], secret=PW + b"\n")
    assert _steps(piped.stderr) == []
    primary, secondary = pty.openpty()
    try:
        p = subprocess.run(
            args, input=PW + b"\n", stdout=subprocess.PIPE, stderr=secondary,
            env={**os.environ, "VMSHIELD_DB": str(db)}, timeout=120, check=False,
        )  # fmt: skip
        os.close(secondary)
        secondary = -1
        said = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            said += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert p.returncode == 0, said
    steps = [s.split(" (about ")[0] for s in _steps(said.decode().replace("\r", ""))]
    image = db.parent / "disks" / "web1-2.img"
    assert steps == ["[1/3] checking the password of alice",
                     f"[2/3] writing {image} and its keyslot",
                     "[3/3] the keystore verifier of alice"], said  # fmt: skip
    assert b"[" not in p.stdout
