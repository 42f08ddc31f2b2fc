"""Deep erase of LUKS images: every method's passes, leftovers, sparseness, certificate."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from nbd_plugin.erase import METHODS, EraseOptions, Pattern, erase
from nbd_plugin.erase.journal import journal_path
from nbd_plugin.erase.keystream import Keystream
from nbd_plugin.erase.overwrite import Engine, chunks, close_target, open_target
from nbd_plugin.erase.progress import Reporter
from nbd_plugin.errors import ImageError, UnsupportedError
from nbd_plugin.osutil.extents import Extent, fiemap, merge
from tests.support.erase import (
    MIB,
    block_digests,
    data_extents,
    expected_pass_bytes,
    make_luks,
    opens,
    read_range,
)

KEEP = EraseOptions(discard=False, unlink=False)


class StopBefore(Exception):
    """Raised by StopAt to interrupt an erase at a phase boundary."""


class StopAt(Reporter):
    def __init__(self, phase: str) -> None:
        self.phase = phase

    def start(self, phase: str, label: str, total: int, done: int = 0) -> None:
        if phase == self.phase:
            raise StopBefore(phase)


def test_methods_are_the_documented_passes() -> None:
    z, f, r = Pattern.ZERO, Pattern.ONES, Pattern.RANDOM
    assert {m: METHODS[m].passes for m in METHODS} == {
        "crypto": (),
        "zero": (z,),
        "random": (r,),
        "dod3": (z, f, r),
        "bmb21-2007": (f, r, r, r, f, z),
        "dod7": (r, z, f, r, r, z, f),
    }
    assert all(m.source for m in METHODS.values())


def test_keystream_does_not_depend_on_chunking() -> None:
    key = bytes(range(32))
    whole = expected_pass_bytes("random", key, 3, 4096, 1 * MIB)
    ks = Keystream(key, 3, MIB)
    buf = memoryview(bytearray(MIB + 64))
    parts = b"".join(
        bytes(ks.fill(buf, 4096 + o, n)) for o, n in ((0, 100), (100, 4000), (4100, MIB - 4100))
    )
    assert parts == whole
    assert expected_pass_bytes("random", key, 4, 4096, 4096) != whole[:4096]


def test_chunks_resume_at_a_linear_position() -> None:
    ext = [Extent(0, 10), Extent(100, 30)]
    assert list(chunks(ext, 0, 8)) == [
        (0, 8, 8),
        (8, 2, 10),
        (100, 8, 18),
        (108, 8, 26),
        (116, 8, 34),
        (124, 6, 40),
    ]
    assert list(chunks(ext, 15, 8)) == [(105, 8, 23), (113, 8, 31), (121, 8, 39), (129, 1, 40)]


def _journal(img: Path) -> dict[str, Any]:
    return dict(json.loads(Path(journal_path(str(img), block_device=False)).read_text()))


def _assert_pass_pattern(img: Path, state: dict[str, Any], number: int, pattern: str) -> None:
    key = bytes.fromhex(state["key"])
    for off, length, _ in state["extents"]:
        got = read_range(img, off, length)
        assert got == expected_pass_bytes(pattern, key, number, off, length), (number, off)


@pytest.mark.parametrize("method", ["zero", "random", "dod3", "bmb21-2007", "dod7"])
def test_each_pass_writes_its_pattern_and_nothing_original_remains(
    tmp_path: Path, method: str
) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    original = block_digests(img)
    holes_before = data_extents(img)
    passes = METHODS[method].passes
    for k in range(1, len(passes) + 1):
        # run up to the start of the next phase, then look at what pass k left behind
        stop = f"pass{k + 1}" if k < len(passes) else "verify"
        with pytest.raises(StopBefore):
            erase(str(img), method, KEEP, StopAt(stop))
        _assert_pass_pattern(img, _journal(img), k, passes[k - 1].value)
        assert not opens(img)
    cert = erase(str(img), method, KEEP)
    assert cert.data["verification"]["result"] == "passed"
    assert cert.data["resumed"] == len(passes)
    assert not block_digests(img) & original
    assert data_extents(img) == holes_before
    assert not Path(journal_path(str(img), block_device=False)).exists()


def test_crypto_erase_makes_the_image_unreadable_and_keeps_the_payload(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    assert opens(img)
    payload_before = read_range(img, 2 * MIB, 12 * MIB)
    header_blocks = {
        hashlib.sha256(read_range(img, o, 4096)).digest() for o in range(0, 2 * MIB, 4096)
    }
    cert = erase(str(img), "crypto", KEEP)
    assert not opens(img)
    assert read_range(img, 2 * MIB, 12 * MIB) == payload_before
    assert not block_digests(img) & (header_blocks - {hashlib.sha256(bytes(4096)).digest()})
    crypto = cert.data["crypto_erase"]
    assert crypto["performed"] and crypto["overwrites"] == 3
    assert cert.data["nist_sp800_88_rev2"]["category"] == "Purge"
    assert cert.data["passes"] == []


def test_crypto_erase_of_luks2(tmp_path: Path) -> None:
    img = tmp_path / "disk2.img"
    make_luks(img, version=2)
    assert opens(img)
    cert = erase(str(img), "crypto", KEEP)
    assert not opens(img)
    assert cert.data["target"]["luks_version"] == 2
    # both binary headers + JSON areas (2 x 16 KiB) and the keyslot area are covered
    assert cert.data["crypto_erase"]["regions"][0][0] == 0
    assert sum(n for _, n in cert.data["crypto_erase"]["regions"]) >= 32768 + 4096


def test_crypto_erase_takes_under_a_second_at_any_size(tmp_path: Path) -> None:
    img = tmp_path / "huge.img"
    make_luks(img, size=256 << 30, data=False)  # sparse, 256 GiB
    t0 = time.monotonic()
    cert = erase(str(img), "crypto")  # full order: wipe, verify, punch hole, unlink
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, elapsed
    assert not img.exists()
    assert cert.data["unlinked"] and cert.data["discard"]["how"] == "punch hole"
    assert Path(cert.path).exists()


def test_full_order_discards_and_unlinks(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    cert = erase(str(img), "zero")
    assert not img.exists()
    assert cert.data["discard"] == {"performed": True, "how": "punch hole", "result": "done"}
    assert cert.data["unlinked"] is True
    assert cert.path == str(img) + ".erase-certificate.json"


def test_certificate_records_what_happened(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    allocated = sum(n for _, n in data_extents(img))
    before = time.time()
    cert = erase(str(img), "dod3", KEEP)
    d = cert.data
    blob = Path(cert.path).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == cert.sha256
    assert json.loads(blob) == d
    assert d["target"]["path"] == str(img) and d["target"]["size"] == 16 * MIB
    assert d["target"]["allocated_bytes"] == allocated
    assert d["method"] == {
        "name": "dod3",
        "passes": ["00", "ff", "random"],
        "source": METHODS["dod3"].source,
    }
    assert [p["pattern"] for p in d["passes"]] == ["00", "ff", "random"]
    assert all(p["bytes"] == allocated for p in d["passes"])
    assert d["bytes_overwritten"] == 3 * allocated + d["crypto_erase"]["bytes"]
    assert d["verification"]["result"] == "passed"
    assert d["verification"]["bytes_read"] == allocated
    assert d["tool"]["name"] == "vmshield" and d["tool"]["version"]
    assert d["started"] <= d["finished"] and d["duration_seconds"] >= 0
    assert time.strftime("%Y-%m-%d", time.gmtime(before)) in d["started"]
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert d["storage"]["filesystem"] == {"ext2/ext3": "ext4"}.get(fs, fs)
    assert d["storage"]["kind"] == "file" and d["storage"]["sparse_file"] is True
    assert d["nist_sp800_88_rev2"]["category"] == "Purge"
    # anyone can re-verify the final random pass from the certificate alone
    key = bytes.fromhex(d["keystream"]["erase_key"])
    off, n = data_extents(img)[-1]
    assert read_range(img, off, n) == expected_pass_bytes("random", key, 3, off, n)


def test_plain_file_is_overwritten_but_crypto_refused(tmp_path: Path) -> None:
    img = tmp_path / "plain.img"
    img.write_bytes(os.urandom(3 * MIB + 512))  # unaligned tail: the buffered path
    with pytest.raises(UnsupportedError, match="not a LUKS image"):
        erase(str(img), "crypto", KEEP)
    cert = erase(str(img), "random", EraseOptions(discard=False, unlink=False, force=True))
    assert cert.data["crypto_erase"]["performed"] is False
    assert cert.data["nist_sp800_88_rev2"]["category"] in ("Clear", "not assured")
    assert cert.data["verification"]["result"] == "passed"


def test_verification_notices_a_block_that_did_not_take(tmp_path: Path) -> None:
    img = tmp_path / "v.img"
    img.write_bytes(bytes(4 * MIB))
    target = open_target(str(img))
    engine = Engine(target, bytes(32))
    try:
        ext = [Extent(0, 4 * MIB)]
        assert engine.verify(Pattern.ZERO, 1, ext, lambda p: None) == (0, None)
        with open(img, "r+b") as f:
            f.seek(MIB + 10)
            f.write(b"x")
        assert engine.verify(Pattern.ZERO, 1, ext, lambda p: None) == (4096, MIB + 10)
    finally:
        engine.close()
        close_target(target)


def test_resume_with_another_method_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    with pytest.raises(StopBefore):
        erase(str(img), "dod3", KEEP, StopAt("pass2"))
    with pytest.raises(ImageError, match="--method dod3"):
        erase(str(img), "zero", KEEP)
    assert erase(str(img), "dod3", KEEP).data["resumed"] == 1


def _mapped(path: Path) -> list[tuple[int, int]]:
    """Extents holding blocks (FIEMAP: written or unwritten), merged."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(e.offset, e.length) for e in merge(fiemap(fd, os.fstat(fd).st_size) or [])]
    finally:
        os.close(fd)


def test_sparse_image_stays_sparse_and_unwritten_extents_are_overwritten(tmp_path: Path) -> None:
    img = tmp_path / "sparse.img"
    make_luks(img, size=32 * MIB)
    # zero-range leaves the old ciphertext blocks in place as "unwritten" extents, which
    # SEEK_DATA may call holes: FIEMAP still finds them
    subprocess.run(["fallocate", "-z", "-o", str(4 * MIB), "-l", str(MIB), str(img)], check=True)
    mapped = _mapped(img)
    cert = erase(str(img), "random", KEEP)
    assert _mapped(img) == mapped
    assert cert.data["target"]["allocated_bytes"] == sum(n for _, n in mapped)
    key = bytes.fromhex(cert.data["keystream"]["erase_key"])
    assert read_range(img, 4 * MIB, MIB) == expected_pass_bytes("random", key, 1, 4 * MIB, MIB)
    assert read_range(img, 20 * MIB, MIB) == bytes(MIB)  # a hole reads zeros, as before


def test_kill_between_unlink_and_certificate_is_finished_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    from nbd_plugin.erase import certificate, engine

    real_write = certificate.write

    def crash(data: dict[str, Any], path: str) -> Any:
        raise OSError(5, "simulated crash")

    monkeypatch.setattr(engine, "write", crash)
    with pytest.raises(OSError, match="simulated"):
        erase(str(img), "zero")
    assert not img.exists()
    monkeypatch.setattr(engine, "write", real_write)
    cert = erase(str(img), "zero")
    assert cert.data["unlinked"] is True and cert.data["resumed"] == 1
    assert cert.data["verification"]["result"] == "passed"
    assert not Path(journal_path(str(img), block_device=False)).exists()
    with pytest.raises(ImageError, match="no such file"):
        erase(str(img), "zero")
