"""Every `scripts/bench` entry point starts from the repository root as `scripts/bench` runs
it (the lab moved under scripts/lab: a path computed from a module's own location broke once),
and the host-server bench runs end to end on a tiny scale. Figures are not judged here: the
benchmarks print them; this only proves each one still runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "module",
    [
        "scripts.lab.bench.disk.cli",
        "scripts.lab.bench.disk.host",
        "scripts.lab.bench.erase",
        "scripts.lab.bench.usb",
        "scripts.lab.bench.startup",
        "scripts.lab.bench.postgres",
    ],
)
def test_each_bench_starts(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_bench_host_runs_on_a_tiny_scale(tmp_path: Path) -> None:
    figures = tmp_path / "host.json"
    out = subprocess.run(
        [sys.executable, "-m", "scripts.lab.bench.disk.host", "--disks", "2", "--disk-size", "4",
         "--read-size", "4", "--parallel", "2", "--runs", "1", "--dir", str(tmp_path),
         "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    got = json.loads(figures.read_text())
    assert got["raw"]["disks"] == 2 and got["figures"]
