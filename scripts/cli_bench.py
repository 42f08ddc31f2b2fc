"""`scripts/bench cli`: how long `vmshield` takes from invocation to exit, measured from outside.

Runs the installed `vmshield` script as a user would (a fresh process each time, its own
keystore in a temporary directory) and reports min / median / max wall time per command:
`vmshield --version` and `vmshield usb block` (a rule commit, the live-USB path whose point
is real time). Bytecode is cached as on an installed host (the warm-up run writes
`__pycache__`, even when PYTHONDONTWRITEBYTECODE is set here). Issue 26 asks for <= 150 ms
for both on this machine kind.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VMSHIELD = str(Path(sys.executable).parent / "vmshield")
TARGET_MS = 150.0


def _run(args: list[str], env: dict[str, str], stdin: str | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(
        [VMSHIELD, *args], env=env, input=stdin, text=True, capture_output=True, check=True
    )
    return (time.perf_counter() - start) * 1000


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
        commands = {
            "vmshield --version": ["--version"],
            "vmshield usb block web 0781:5567": ["usb", "block", "web", "0781:5567"],
        }
        ok = True
        for label, argv in commands.items():
            _run(argv, env)  # warm the page cache
            times = sorted(_run(argv, env) for _ in range(args.runs))
            median = statistics.median(times)
            ok &= median <= TARGET_MS
            print(
                f"{label:36} min {times[0]:6.1f} ms  median {median:6.1f} ms  "
                f"max {times[-1]:6.1f} ms  ({args.runs} runs; target <= {TARGET_MS:.0f} ms)"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
