"""scripts/bench's arithmetic: best-of-N, ratios, CPU per GiB, targets, JSON (no servers run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.lab.bench.disk.cli import parse_size
from scripts.lab.bench.disk.measure import Sample, cpu_seconds, memory_kib, peak_rss_kib
from scripts.lab.bench.disk.report import Report, Row
from scripts.lab.bench.disk.servers import SERVERS, Paths, before

MIB = 1 << 20


def test_parse_size() -> None:
    assert parse_size("256M") == 256 * MIB
    assert parse_size("1g") == 1 << 30
    assert parse_size("4k") == 4096
    assert parse_size("64KiB") == 65536
    assert parse_size("1000") == 1000


def make_report() -> Report:
    rows = {s.key: Row(s) for s in SERVERS}
    size = 100 * MIB
    # vmshield: 2 s then 1 s (best 1 s, 0.5 CPU s); luks filter: 2 s and 1 CPU s.
    rows["vmshield"].add("read", MIB, Sample(2.0, 1.0))
    rows["vmshield"].add("read", MIB, Sample(1.0, 0.5))
    rows["luks"].add("read", MIB, Sample(2.0, 1.0))
    rows["floor"].add("read", MIB, Sample(0.5, 0.1))
    # Through QEMU (50 MiB per run): vmshield 0.5 s, nbdkit file 0.4 s.
    rows["vmshield"].add("qemu read", MIB, Sample(0.5, 0.2))
    rows["file"].add("qemu read", MIB, Sample(0.4, 0.1))
    rows["vmshield"].startup_s = 0.8
    rows["vmshield"].add_memory({"rss": 200 << 10, "pss": 90 << 10, "private": 40 << 10})
    rows["vmshield"].add_memory({"rss": 100 << 10, "pss": 95 << 10, "private": 30 << 10})
    return Report(size, [MIB], 2, list(rows.values()), {"date": "test"}, [MIB], 50 * MIB)


def test_best_of_n_ratios_and_cpu() -> None:
    report = make_report()
    vm, luks = report.row("vmshield"), report.row("luks")
    assert vm is not None and luks is not None
    assert report.mbps(vm, "read", MIB) == pytest.approx(100 * MIB / 1e6)
    assert report.cpu_per_gib(vm, "read", MIB) == pytest.approx(0.5 * 1024 / 100)
    assert report.ratio("luks", "read", MIB) == pytest.approx(2.0)
    assert report.ratio("luks", "read", MIB, cpu=True) == pytest.approx(2.0)
    assert report.ratio("floor", "read", MIB) == pytest.approx(0.5)
    assert report.ratio("qemu", "read", MIB) is None  # qemu has no sample
    assert report.mbps(vm, "qemu read", MIB) == pytest.approx(100 * MIB / 1e6)  # 50 MiB/0.5 s
    assert report.ratio("file", "qemu read", MIB) == pytest.approx(0.8)
    assert vm.memory_kib == {"rss": 200 << 10, "pss": 95 << 10, "private": 40 << 10}


def test_targets_and_json() -> None:
    report = make_report()
    met = {t.label(): ok for t, _, ok in report.targets()}
    assert met["1 MiB read, MB/s vs luks"] is True  # 2.0 >= 2.0
    assert met["1 MiB write, MB/s vs luks"] is False  # not measured
    assert met["1 MiB qemu read, MB/s vs file"] is True  # 0.8 >= 0.8
    assert met["1 MiB qemu write, MB/s vs file"] is False
    assert "4 KiB read, MB/s vs floor" not in met  # 4 KiB was not run
    assert report.startup_met() is True
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["ratios"]["vmshield/luks"]["1 MiB read"] == pytest.approx(2.0)
    assert doc["ratios"]["vmshield/file"]["1 MiB qemu read"] == pytest.approx(0.8)
    assert doc["rows"]["vmshield"]["seconds"]["1 MiB read"] == [2.0, 1.0]
    assert doc["rows"]["vmshield"]["memory_kib"]["pss"] == 95 << 10
    assert doc["targets"][-1] == {
        "target": "vmshield start to first byte, s",
        "at_most": 1.5,
        "measured": 0.8,
        "met": True,
    }
    text = report.markdown()
    assert "| 1 MiB read, MB/s vs luks | 2.00 | 2.00 | yes |" in text
    assert "| 1 MiB qemu read, MB/s vs file | 0.80 | 0.80 | yes |" in text
    assert "| start to first byte, s | at most 1.50 | 0.80 | yes |" in text
    assert "| vmshield plugin | 0.80 | — | — | 200 | 95 | 40 |" in text


def test_the_floor_is_the_fastest_thread_model_per_column() -> None:
    rows = {s.key: Row(s) for s in SERVERS}
    size = 100 * MIB
    rows["vmshield"].add("read", 4096, Sample(1.0, 0.5))
    rows["vmshield"].add("write", 4096, Sample(1.0, 0.5))
    rows["floor"].add("read", 4096, Sample(2.0, 0.5))  # parallel: slowest at 4 KiB reads
    rows["floor"].add("write", 4096, Sample(0.5, 0.5))  # ... fastest at 4 KiB writes
    rows["floor-serialize"].add("read", 4096, Sample(0.8, 0.2))
    rows["floor-serialize"].add("write", 4096, Sample(0.9, 0.2))
    rows["floor-serialize-all"].add("read", 4096, Sample(0.5, 0.4))
    rows["floor-serialize-all"].add("write", 4096, Sample(1.0, 0.1))
    report = Report(size, [4096], 1, list(rows.values()), {"date": "test"})
    assert report.ratio("floor", "read", 4096) == pytest.approx(0.5)  # vs serialize_all
    assert report.ratio("floor", "write", 4096) == pytest.approx(0.5)  # vs parallel
    # MB per CPU-second: the most efficient floor (serialize_requests reads: 0.2 CPU s).
    assert report.ratio("floor", "read", 4096, cpu=True) == pytest.approx(0.4)
    met = {t.label(): (m, ok) for t, m, ok in report.targets()}
    assert met["4 KiB read, MB/s vs floor"] == (pytest.approx(0.5), False)
    assert "| floor = the fastest of | floor-serialize-all | floor |" in report.markdown()
    doc = report.to_json()
    assert doc["ratios"]["floor row"]["4 KiB read"] == "floor-serialize-all"
    assert doc["ratios"]["vmshield/floor"]["4 KiB write"] == pytest.approx(0.5)


def test_proc_readers_on_this_process() -> None:
    import os

    assert cpu_seconds(os.getpid()) > 0
    assert peak_rss_kib(os.getpid()) > 1000
    mem = memory_kib(os.getpid())
    assert 0 < mem["private"] <= mem["pss"] <= mem["rss"]


def test_luks2_has_ratios_and_issue_25_targets_of_its_own(tmp_path: Path) -> None:
    rows = {s.key: Row(s) for s in SERVERS}
    rows["vmshield-luks2"].add("read", 64 << 10, Sample(1.0, 0.5))
    rows["floor-serialize"].add("read", 64 << 10, Sample(0.9, 0.5))
    rows["vmshield-luks2"].add("qemu read", MIB, Sample(1.0, 0.5))
    rows["file"].add("qemu read", MIB, Sample(0.5, 0.5))
    report = Report(100 * MIB, [64 << 10], 1, list(rows.values()), {"date": "t"}, [MIB], 10 * MIB)
    met = {t.label(): (m, ok) for t, m, ok in report.targets()}
    assert met["vmshield-luks2: 64 KiB read, MB/s vs floor"] == (pytest.approx(0.9), True)
    assert met["vmshield-luks2: 1 MiB qemu read, MB/s vs file"] == (pytest.approx(0.5), False)
    assert met["64 KiB read, MB/s vs floor"] == (None, False)  # LUKS1 did not run
    text = report.markdown()
    assert "| **vmshield-luks2 / floor** | 0.90 | — |" in text
    assert "| **vmshield-luks2 / file** | 0.50 | — |" in text
    assert "| targets met | | 1 of " in text
    doc = report.to_json()
    assert doc["ratios"]["vmshield-luks2/floor"]["64 KiB read"] == pytest.approx(0.9)
    with pytest.raises(FileNotFoundError, match=r"no nbd_plugin/plugin\.py"):
        before(str(tmp_path))
    (tmp_path / "nbd_plugin").mkdir()
    (tmp_path / "nbd_plugin" / "plugin.py").write_text("")
    with pytest.raises(FileNotFoundError, match=r"no \.venv there"):
        before(str(tmp_path))
    (tmp_path / ".venv").mkdir()
    old, old2 = before(str(tmp_path))
    assert (old.key, old.image, old2.key, old2.image) == ("before", "luks", "before-luks2", "luks2")
    argv = old.argv(Paths("s.sock", "i.img", "p"))
    assert str(tmp_path / "nbd_plugin" / "plugin.py") in argv
