"""`scripts/bench cli`: how long `vmshield` takes from invocation to exit, measured from outside.

Runs the installed `vmshield` script as a user would (a fresh process each time, its own
keystore in a temporary directory) and reports min / median / max wall time per command,
and the median CPU time (user + system: what the load of a shared machine inflates least):
`vmshield --version` and `vmshield usb block` (a rule commit, the live-USB path whose point
is real time: each run blocks another VID:PID, so each one inserts a rule and its audit row,
never the no-op of a rule already there; the output is checked for it). Bytecode is cached
as on an installed host (the warm-up run writes `__pycache__`, even when
PYTHONDONTWRITEBYTECODE is set here). Issue 26 asks for <= 150 ms for both on this machine
kind. The load average is printed before and after: wall times follow it.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

VMSHIELD = str(Path(sys.executable).parent / "vmshield")
TARGET_MS = 150.0


def _run(
    args: list[str], env: dict[str, str], stdin: str | None = None, expect: str = ""
) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one run, in ms; its stdout must hold `expect`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [VMSHIELD, *args], env=env, input=stdin, text=True, capture_output=True, check=True
    )
    wall = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    if expect not in done.stdout:
        raise SystemExit(f"vmshield {' '.join(args)} printed {done.stdout!r}, not {expect!r}")
    return wall, cpu


def _block(n: int) -> tuple[list[str], str]:
    """`usb block` of a VID:PID no earlier run blocked: a new rule each time (number n + 1)."""
    return ["usb", "block", "web", f"0781:{n:04x}"], f"web rule {n + 1}: block id 0781:{n:04x}"


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench cli", description=__doc__)
    parser.add_argument("--runs", type=int, default=20, help="runs per command (default 20)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VMSHIELD_DB": str(Path(tmp) / "ks.db")}
        # an installed vmshield has its bytecode compiled: let the warm-up runs write it
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        _run(["init"], env)
        _run(["user", "add", "alice"], env, stdin="bench-password-1\n")
        _run(["vm", "add", "web", "--owner", "alice"], env)
        commands: dict[str, Callable[[int], tuple[list[str], str]]] = {
            "vmshield --version": lambda _: (["--version"], "vmshield"),
            "vmshield usb block web 0781:NNNN": _block,
        }
        ok = True
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs before")
        for label, argv_for in commands.items():
            runs = []
            for n in range(args.runs + 1):  # run 0 warms the page cache
                argv, expect = argv_for(n)
                runs.append(_run(argv, env, expect=expect))
            runs = runs[1:]
            times = sorted(wall for wall, _ in runs)
            median = statistics.median(times)
            cpu = statistics.median(c for _, c in runs)
            ok &= median <= TARGET_MS
            print(
                f"{label:34} wall min {times[0]:6.1f} median {median:6.1f} max {times[-1]:6.1f} "
                f"ms, CPU median {cpu:6.1f} ms ({args.runs} runs; target <= {TARGET_MS:.0f} ms)"
            )
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs after")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
