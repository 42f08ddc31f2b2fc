"""`vmshield status` shows the bytes a served disk's clients read and wrote (issue 26 item 6):
a real nbdkit serving a real image, a real NBD client, the real command."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from tests.keystore.test_cli_disk_serve import cli, env, nbd_handle, serve

__all__ = ["env"]  # the fixture, used by name

MIB = 1 << 20


def _shown(db: Path, want: tuple[int, int]) -> dict[str, Any]:
    """The served disk as `status --json` shows it, once its counters are `want` (the
    plugin publishes them at most once a second)."""
    deadline = time.monotonic() + 10
    while True:
        [disk] = json.loads(cli(db, "status", "--json").stdout)["disks"]
        if (disk["read_bytes"], disk["written_bytes"]) == want:
            return dict(disk)
        assert time.monotonic() < deadline, disk
        time.sleep(0.2)


def test_status_counts_the_bytes_clients_read_and_write(env: tuple[Path, Path]) -> None:
    db, sockdir = env
    info = serve(db, sockdir)
    _shown(db, (0, 0))  # published as soon as the server runs
    h = nbd_handle(info["uri"])
    try:
        h.pwrite(b"\x5a" * MIB, 0)
        h.pwrite(b"\xa5" * 4096, 3 * MIB)
        assert h.pread(MIB // 2, 0) == b"\x5a" * (MIB // 2)
        h.flush()
    finally:
        h.shutdown()
    _shown(db, (MIB // 2, MIB + 4096))
    table = cli(db, "status").stdout.splitlines()
    header, row = table[1], table[2]
    assert "READ" in header and "WRITTEN" in header, table
    assert "512 KiB  1.0 MiB" in row, table  # human sizes, as disk list prints
    stats = Path(info["socket"]).with_suffix(".stats")
    assert stat.S_IMODE(os.stat(stats).st_mode) == 0o600  # in the server's private run dir
    cli(db, "disk", "stop", "web1-0")
    assert json.loads(cli(db, "status", "--json").stdout)["disks"] == []
