"""The plugin's I/O counters and the state files they are published in
(nbd_plugin/serve/stats.py, nbd_plugin/osutil/statefile.py)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from nbd_plugin.osutil import statefile
from nbd_plugin.serve.stats import IoStats, Publisher


def test_counts_from_many_threads_add_up() -> None:
    stats = IoStats()

    def work() -> None:
        for _ in range(1000):
            stats.add_read(512)
            stats.add_written(4096)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.snapshot() == {"read_bytes": 4000 * 512, "written_bytes": 4000 * 4096,
                                "reads": 4000, "writes": 4000}  # fmt: skip


def test_published_only_when_changed_atomically_and_privately(tmp_path: Path) -> None:
    path = tmp_path / "web-0.stats"
    stats = IoStats()
    pub = Publisher(stats, str(path), clock=lambda: 1234.5)
    pub.publish()
    first = statefile.read(path)
    assert first == {"read_bytes": 0, "written_bytes": 0, "reads": 0, "writes": 0,
                     "pid": os.getpid(), "updated": 1234.5}  # fmt: skip
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    inode = path.stat().st_ino
    pub.publish()  # nothing changed: not rewritten
    assert path.stat().st_ino == inode
    stats.add_written(4096)
    pub.publish()
    assert path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert statefile.read(path)["written_bytes"] == 4096  # type: ignore[index]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web-0.stats"]  # no temp left


def test_a_reader_refuses_links_other_files_and_garbage(tmp_path: Path) -> None:
    real = tmp_path / "real.stats"
    statefile.publish(real, {"pid": 1})
    link = tmp_path / "link.stats"
    link.symlink_to(real)
    garbage = tmp_path / "garbage.stats"
    garbage.write_bytes(b"\x00not json")
    big = tmp_path / "big.stats"
    big.write_text('{"x": "' + "a" * statefile.MAX_STATE_BYTES + '"}')
    listed = tmp_path / "list.stats"
    listed.write_text("[1, 2]")
    assert statefile.read(real) == {"pid": 1}
    for bad in (link, garbage, big, listed, tmp_path, tmp_path / "missing"):
        assert statefile.read(bad) is None, bad
