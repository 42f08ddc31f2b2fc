"""A pass's times in the certificate agree with an outside clock.

The erase runs in a child process; this test samples the child's /proc/PID/io
``write_bytes`` (what it made the kernel write) with its own wall clock. The pass's bytes
must all have been written between the certificate's ``started_unix`` and ``finished_unix``,
and ``seconds`` must be that interval, so the rate a certificate states is one an observer
could have measured. Not a speed test: no rate is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support.nbd import ROOT

SIZE = 96 << 20
CHILD = """
import json, sys
from nbd_plugin.erase.engine import EraseOptions, erase
opts = EraseOptions(verify=False, discard=False, unlink=False, force=True)
print(json.dumps(erase(sys.argv[1], "zero", opts).data["passes"]))
"""
SLACK = 0.05  # seconds: sampling interval plus scheduling on a loaded machine


def test_pass_interval_holds_every_byte_an_outside_clock_saw(tmp_path: Path) -> None:
    target = tmp_path / "target.img"
    with target.open("wb") as f:
        f.write(os.urandom(SIZE))
        os.fsync(f.fileno())
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    samples: list[tuple[float, int]] = []
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/io") as f:
                fields = dict(line.split(": ") for line in f.read().splitlines())
            samples.append((time.time(), int(fields["write_bytes"])))
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.001)
    out, _ = child.communicate()
    assert child.returncode == 0
    (one,) = json.loads(out.strip().splitlines()[-1])
    assert one["written_bytes"] == SIZE
    base = samples[0][1]
    first = next(t for t, b in samples if b - base >= 1 << 20)  # the pass's first MiB is out
    last = next(t for t, b in samples if b - base >= SIZE)  # all of it
    assert one["started_unix"] - SLACK <= first
    assert last <= one["finished_unix"] + SLACK
    assert abs(one["seconds"] - (one["finished_unix"] - one["started_unix"])) < 0.01
    assert abs(one["bytes_per_second"] * one["seconds"] / SIZE - 1) < 0.01
