"""The machinery of the walkthrough (walkthrough.py), kept apart so it reads as the story.

`Report` prints each command and each check (✔/✘); `Host` runs commands in the demo directory
and stops everything it started; `Console` drives a guest's serial console; `SimulatedStick`
plays a USB stick's owner (the fake usbredir owner of usbgate's tests) in a thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.lab import ROOT
from scripts.lab.qmp import Qmp
from usbgate.simulator import FakeDevice, FakeOwner

BIN = ROOT / ".venv" / "bin"
SAFE_TO_WIPE = ".vmshield-demo"  # only a directory holding this file (or empty) is wiped
SOCKET_MAX = 107  # bytes in a unix socket path
STEPS = 7  # the walkthrough's steps (scripts/lab/demo/walkthrough.py main)


class StepFailed(Exception):
    """A check failed that the following steps depend on."""


# --- printing and checking ------------------------------------------------------------------


@dataclass
class Report:
    """The checks made so far, printed as they happen: ✔ passed, ✘ failed."""

    demo_dir: Path
    checks: list[tuple[str, bool]] = field(default_factory=list)
    steps: list[tuple[str, bool, float]] = field(default_factory=list)
    total: int = STEPS  #: how many steps this run has (scripts/lab/demo/walkthrough.py main)

    def shown(self, text: str) -> str:
        return text.replace(str(self.demo_dir), "$DEMO")

    def command(self, argv: list[str]) -> None:
        words = [Path(argv[0]).name] + [shlex.quote(a) for a in argv[1:]]
        print(self.shown("  $ " + " ".join(words)), flush=True)

    def output(self, text: str, limit: int | None = None) -> None:
        lines = text.rstrip("\n").splitlines()
        if limit is not None and len(lines) > limit:
            lines = [*lines[:limit], f"... ({len(lines) - limit} more lines)"]
        for line in lines:
            print(self.shown("    " + line), flush=True)

    def check(self, ok: bool, text: str, *, fatal: bool = False) -> bool:
        self.checks.append((text, ok))
        shown = self.shown(text).replace("\n", "\n    ")  # continuation lines indented
        print(f"  {'✔' if ok else '✘'} {shown}", flush=True)
        if not ok and fatal:
            raise StepFailed(text)
        return ok

    @contextmanager
    def step(self, number: int, title: str) -> Iterator[None]:
        print(f"\n[{number}/{self.total}] {title}", flush=True)
        before, start = len(self.checks), time.monotonic()
        ok = False
        try:
            yield
            ok = all(passed for _, passed in self.checks[before:])
        finally:
            seconds = time.monotonic() - start
            self.steps.append((f"[{number}/{self.total}] {title}", ok, seconds))
            print(f"  ({seconds:.1f} s)", flush=True)


# --- processes the demo starts ------------------------------------------------------------


@dataclass
class Host:
    """Runs commands against the demo's keystore; stops everything it started, whatever happens."""

    demo_dir: Path
    report: Report
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    served: set[str] = field(default_factory=set)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.demo_dir / "keystore.db"

    def path(self, name: str) -> Path:
        return self.demo_dir / name

    def env(self) -> dict[str, str]:
        return dict(os.environ, VMSHIELD_DB=str(self.db))

    def vmshield(
        self, *args: str, expect: int = 0, limit: int | None = None, show: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `vmshield ARGS` (VMSHIELD_DB=$DEMO/keystore.db), print it and what it said."""
        argv = [str(BIN / "vmshield"), *args]
        self.report.command(argv)
        proc = subprocess.run(argv, env=self.env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        if show or proc.returncode != expect:
            self.report.output(proc.stderr + proc.stdout, limit)  # progress first, then result
        if proc.returncode != expect:
            raise StepFailed(
                f"vmshield {args[0]} {args[1] if len(args) > 1 else ''} exited "
                f"{proc.returncode}, expected {expect}"
            )
        if args[:2] == ("disk", "serve") and proc.returncode == 0:
            self.served.add(args[2])
        elif args[:2] == ("disk", "stop"):
            self.served.discard(args[2])
        return proc

    def audit(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest audit rows (quietly: not printed)."""
        out = subprocess.run(
            [str(BIN / "vmshield"), "audit", "--json", "--limit", str(limit)],
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        rows: list[dict[str, Any]] = json.loads(out)
        return rows

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """A long-running process in its own session: Ctrl-C reaches us, we stop it in order."""
        self.report.command(argv)
        proc = subprocess.Popen(argv, env=self.env(), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        """Stop whatever is still running: our processes, then the disk servers."""
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as exc:
                print(f"  cleanup: {exc}", file=sys.stderr)
        for proc in reversed(self.procs):
            self.stop(proc)
        for disk in sorted(self.served):
            subprocess.run(
                [str(BIN / "vmshield"), "disk", "stop", disk],
                env=self.env(),
                capture_output=True,
                timeout=30,
                check=False,
            )
        self.served.clear()


# --- the guest console and the simulated USB stick ---------------------------------------


class Console:
    """A running QEMU's serial console (stdio): its output collected, its input writable."""

    def __init__(self, host: Host, proc: subprocess.Popen[bytes]) -> None:
        self.host, self.proc = host, proc
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self.changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if m := regex.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    tail = "\n".join(self.lines[-15:])
                    raise StepFailed(f"guest console never showed {pattern!r}; last lines:\n{tail}")
                self.changed.wait(min(left, 0.5))

    def finish(self, timeout: float) -> int | None:
        """Wait for QEMU to exit by itself (the guest powers off); its exit status."""
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        code = self.proc.poll()
        self.host.stop(self.proc)
        self.reader.join(5)
        return code

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


class SimulatedStick:
    """The owner's side of usbredir for one USB stick (what `usbredirect --to` does for real),
    run in a thread with its own event loop so the main thread can stay synchronous."""

    def __init__(self, address: str, device: FakeDevice) -> None:
        self.address, self.device = address, device
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.owner: FakeOwner | None = None

    def plug(self) -> None:
        """Connect to usbgate and announce the device (interface_info, ep_info, connect)."""
        self.thread.start()
        coro = FakeOwner.connect(self.address, self.device)
        self.owner = asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def wait_closed(self, timeout: float) -> bool:
        """Has the other side (usbgate) closed the connection (within `timeout` seconds)?"""
        deadline = time.monotonic() + timeout
        while self.owner is not None and time.monotonic() < deadline:
            if self.owner.closed.is_set():
                return True
            time.sleep(0.01)
        return self.owner is not None and self.owner.closed.is_set()

    def was_rejected(self) -> bool:
        """Did the gateway send filter_reject (it refuses the device to its owner)?"""
        return self.owner is not None and self.owner.filter_rejected.is_set()

    def close(self) -> None:
        if self.thread.is_alive():
            if self.owner is not None:
                asyncio.run_coroutine_threadsafe(self.owner.close(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        self.loop.close()


def prepare(demo_dir: Path, disk: str) -> None:
    """Wipe the demo directory (only if it is ours, or empty), stopping old servers first."""
    if demo_dir.exists():
        if any(demo_dir.iterdir()) and not (demo_dir / SAFE_TO_WIPE).exists():
            raise SystemExit(
                f"demo: {demo_dir} is not empty and not a demo directory "
                f"(no {SAFE_TO_WIPE}); choose another --dir"
            )
        old_db = demo_dir / "keystore.db"
        if old_db.exists():  # a previous run that was killed: its servers may still run
            env = dict(os.environ, VMSHIELD_DB=str(old_db))
            subprocess.run(
                [str(BIN / "vmshield"), "disk", "stop", disk],
                env=env,
                capture_output=True,
                timeout=30,
                check=False,
            )
        shutil.rmtree(demo_dir)
    demo_dir.mkdir(parents=True, mode=0o700)
    (demo_dir / SAFE_TO_WIPE).write_text("scripts/demo wipes this directory on every run\n")
    (demo_dir / "run").mkdir(mode=0o700)
    longest = demo_dir / "run" / f"{disk}-ro.sock.pid"
    if len(str(longest)) > SOCKET_MAX:
        raise SystemExit(
            f"demo: {demo_dir} is too long for unix socket paths "
            f"({SOCKET_MAX} bytes); choose a shorter --dir"
        )


class RedirDevice:
    """A usb-redir device of the running QEMU, watched over QMP (`attached` is reliable;
    `info usb` lists a usb-redir device whether a USB device is attached or not)."""

    def __init__(self, qmp: Qmp, device_id: str) -> None:
        self.qmp, self.path = qmp, f"/machine/peripheral/{device_id}"

    def attached(self) -> bool:
        return bool(self.qmp.execute("qom-get", path=self.path, property="attached"))

    def wait(self, *, attached: bool, timeout: float) -> float | None:
        """Poll until `attached` has the wanted value; when it was seen (monotonic), or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.attached() == attached:
                return time.monotonic()
            time.sleep(0.001)
        return None


def wait_for_line(log: Path, needle: str, timeout: float) -> str:
    """The first line of `log` containing `needle` (the last line so far on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text(errors="replace").splitlines()
        found = [line for line in lines if needle in line]
        if found or time.monotonic() > deadline:
            return (found or lines or [""])[0 if found else -1].strip()
        time.sleep(0.05)


def wait_audit(host: Host, action: str, timeout: float) -> list[dict[str, Any]]:
    """usbgate writes its audit rows from a queue: wait until `action` shows up."""
    deadline = time.monotonic() + timeout
    while True:
        rows = host.audit(10)
        if any(x["action"] == action for x in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)
