"""Erase survives SIGKILL: the same command continues and ends with the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nbd_plugin.erase import EraseOptions, erase
from nbd_plugin.erase.journal import journal_path
from tests.support import ROOT
from tests.support.erase import copy_sparse, data_extents, make_luks, opens

KEY = bytes(range(32))

# The child erases slowly (a reporter that sleeps per chunk) and checkpoints at every chunk,
# so the parent can catch it in the middle of a pass.
CHILD = """
import sys, time
from nbd_plugin.erase import EraseOptions, erase
from nbd_plugin.erase.progress import Reporter
from tests.support import ROOT

class Slow(Reporter):
    def update(self, done):
        time.sleep(0.05)

opts = EraseOptions(discard=False, unlink=False, erase_key=bytes(range(32)),
                    checkpoint_bytes=1, checkpoint_seconds=0)
erase(sys.argv[1], "dod3", opts, Slow())
"""


def _journal(img: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(Path(journal_path(str(img), block_device=False)).read_text()))
    except (FileNotFoundError, ValueError):
        return None


def test_sigkill_mid_pass_then_resume_ends_identical(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_luks(a, size=64 << 20)
    with open(a, "r+b") as f:  # ~60 MiB allocated: 8 chunks a pass, a hole at [10, 12) MiB
        f.seek(14 << 20)
        f.write(os.urandom(48 << 20))
    copy_sparse(a, b)  # identical twin with the same holes
    assert data_extents(a) == data_extents(b)
    assert opens(b)

    erase(str(a), "dod3", EraseOptions(discard=False, unlink=False, erase_key=KEY))

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(b)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            j = _journal(b)
            # pass 3 (random) started, part of it is on the medium, and with two writes in
            # flight at most 40 of the 60 MiB can be written when the kill lands
            if j and j["pass_index"] == 2 and 0 < int(j["done"]) <= 24 << 20:
                break
            assert child.poll() is None, "the erase finished before it could be killed"
            time.sleep(0.01)
        else:
            raise AssertionError("the erase never reached the middle of pass 3")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = _journal(b)
    assert killed_at is not None and killed_at["phase"] == "overwrite"
    assert a.read_bytes() != b.read_bytes()  # b was really stopped half-way

    cert = erase(str(b), "dod3", EraseOptions(discard=False, unlink=False))
    assert cert.data["resumed"] == 1
    assert cert.data["passes"][2]["resumed_at"] == killed_at["done"]
    # the resumed pass's rate counts only the bytes this run wrote
    resumed = cert.data["passes"][2]
    assert resumed["written_bytes"] == resumed["bytes"] - killed_at["done"]
    assert cert.data["verification"]["result"] == "passed"
    assert a.read_bytes() == b.read_bytes()
    # the same holes (st_blocks also counts extent-tree blocks, which depend on fragmentation)
    assert data_extents(a) == data_extents(b)
