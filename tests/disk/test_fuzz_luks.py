"""Mutation fuzzing of LUKS1 and LUKS2 headers through ``info`` and ``open_volume``.

Every case may only raise the product's own errors (``nbd_plugin.errors``); a wrong passphrase
must never open. LUKS2 cases mostly edit the JSON (as a document or as text) and recompute the
header checksum, so the JSON parser and the metadata checks are what gets fuzzed, not only the
checksum. Replay a failure with the seed and case number it prints; the long run is

    VMSHIELD_FUZZ_CASES=1000000 nice -n 19 .venv/bin/python -m pytest tests/disk/test_fuzz_luks.py

(cases per target). Cheap images keep a case fast: PBKDF2 with 1000 iterations, and KDF costs
above a small ceiling are refused (the ceilings are patched down here; the product refuses
only what cryptsetup's limits refuse). AF-merge is memoised by its input: the merge itself is
checked against cryptsetup elsewhere, and the wrong passphrase makes the same input each time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nbd_plugin import luks
from nbd_plugin.crypto import argon2, pbkdf2
from nbd_plugin.errors import InvalidPassphrase, VmshieldError
from nbd_plugin.luks import af
from nbd_plugin.luks.luks1.format import HEADER_SIZE, Luks1Header
from tests.support.fuzzing import cases, mutate, where

PW = b"fuzz passphrase"
WRONG = b"not the passphrase"
SIZE = 1 << 20
HDR = 16384
INTS = (0, 1, 2, 3, 7, 8, 16, 31, 32, 64, 511, 512, 1000, 3999, 4000, 4001, 4096, 65535,
        65536, 1 << 24, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1,
        1 << 63, (1 << 64) - 1, 1 << 64, -1, -(1 << 63))  # fmt: skip
STRINGS = ("", "0", "1", "00", "4096", "16777216", "dynamic", "-1", "1e3", " 1", "0x10",
           "\u0661", "\u00b2", "\uff11", "18446744073709551615", "18446744073709551616",
           "aes-xts-plain64", "aes-cbc-essiv:sha256", "cipher_null-ecb", "twofish-xts-plain64",
           "sha256", "sha1", "whirlpool", "argon2id", "argon2i", "pbkdf2", "luks2", "luks1",
           "raw", "crypt", "reencrypt", "AAAA", "====", "\x00", "\udcff")  # fmt: skip
TEXTS = (b"aes", b"twofish", b"xts-plain64", b"cbc-essiv:sha256", b"cbc-plain", b"ecb",
         b"xts-plain", b"sha1", b"sha512", b"ripemd160", b"whirlpool", b"", b"\xff\xfe",
         b"A" * 32)  # fmt: skip


@pytest.fixture(autouse=True)
def _cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Costs above these ceilings are refused (a header can ask for days of KDF work)."""
    # every fuzzed copy the reader falls back from is logged: a long run would hoard them
    monkeypatch.setattr(logging.getLogger("vmshield.luks2"), "disabled", True)
    monkeypatch.setattr(pbkdf2, "MAX_ITERATIONS", 20_000)
    monkeypatch.setattr(argon2, "MAX_TIME", 4)
    monkeypatch.setattr(argon2, "MAX_MEMORY_KIB", 1024)
    merge = functools.lru_cache(maxsize=64)(
        lambda m, k, s, h: bytes(af.merge.__wrapped__(m, k, s, h))  # type: ignore[attr-defined]
    )
    real = af.merge

    def cached(material: Any, key_bytes: int, stripes: int, hash_name: str) -> bytearray:
        return bytearray(merge(bytes(material), key_bytes, stripes, hash_name))

    cached.__wrapped__ = real  # type: ignore[attr-defined]
    monkeypatch.setattr(af, "merge", cached)


class Target:
    """A working copy of a base image: write a mutated header, run the checks, restore it."""

    def __init__(self, base: Path, work: Path, head: int) -> None:
        shutil.copyfile(base, work)
        self.path = str(work)
        self.base = base.read_bytes()[:head]
        self.fd = os.open(work, os.O_RDWR | os.O_CLOEXEC)
        self.opens = self.refused = 0

    def run(self, n: int, header: bytes, *, open_wrong: bool = True, right: bool = False) -> None:
        os.pwrite(self.fd, header, 0)
        try:
            check(self.path, n, open_wrong=open_wrong, right=right)
        finally:
            os.pwrite(self.fd, self.base[: max(len(header), 1)], 0)

    def close(self) -> None:
        os.close(self.fd)


STATS: dict[str, int] = {}


def _count(what: str) -> None:
    STATS[what] = STATS.get(what, 0) + 1


def check(path: str, n: int, *, open_wrong: bool = True, right: bool = False) -> None:
    """info and open_volume: only the product's errors, and no wrong passphrase opens."""
    _count("cases")
    if n and n % 100_000 == 0:  # progress of a long run (shown with -s)
        print(
            f"\n{n} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(STATS.items())), flush=True
        )
    try:
        luks.info(path)
        _count("info described it")
    except VmshieldError:
        _count("info refused it")
    if open_wrong:
        try:
            volume = luks.open_volume(path, WRONG, readonly=True)
        except InvalidPassphrase:
            _count("wrong passphrase: no keyslot opens")
        except VmshieldError:
            _count("wrong passphrase: image refused")
        else:
            volume.close()
            raise AssertionError(f"a wrong passphrase opened the image: {where(n)}")
    if right:
        try:
            luks.open_volume(path, PW, readonly=True).close()
            _count("right passphrase: opened")
        except VmshieldError:
            _count("right passphrase: refused")


def _report(name: str) -> None:
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(STATS.items())))
    STATS.clear()


def _guard(n: int, run: Callable[[], None]) -> None:
    try:
        run()
    except AssertionError:
        raise
    except Exception as exc:  # anything but the product's errors is a finding
        raise AssertionError(f"{type(exc).__name__}: {exc}: {where(n)}") from exc


# ---- LUKS1 ---------------------------------------------------------------------------------
# Every 32-bit field of the phdr (payload offset, key bytes, digest iterations) and the slots.
U32_FIELDS = [104, 108, 164] + [208 + 48 * s + f for s in range(8) for f in (0, 4, 40, 44)]
TEXT_FIELDS = [(8, 32), (40, 32), (72, 32), (168, 40)]


def _luks1_case(rng: random.Random, base: bytes) -> bytes:
    head = bytearray(base[:HEADER_SIZE])
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(5)
        if kind == 0:
            head[rng.randrange(len(head))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            value = rng.choice(INTS) if rng.random() < 0.7 else rng.getrandbits(32)
            struct.pack_into(">I", head, rng.choice(U32_FIELDS), value & 0xFFFFFFFF)
        elif kind == 2:
            off, size = rng.choice(TEXT_FIELDS)
            head[off : off + size] = rng.choice(TEXTS)[:size].ljust(size, b"\0")
        elif kind == 3:
            off = rng.randrange(len(head))
            head[off : off + 8] = rng.randbytes(8)[: len(head) - off]
        else:
            head[0:8] = rng.choice((b"LUKS\xba\xbe\0\1", b"LUKS\xba\xbe\0\2", b"SKUL\xba\xbe\0\2"))
    return bytes(head)


def _parsed(raw: bytes) -> Luks1Header | None:
    try:
        return Luks1Header.unpack(raw)
    except VmshieldError:
        return None


@pytest.mark.slow  # ~20 s for its 25,000 cases here
def test_fuzz_luks1_headers(tmp_path: Path) -> None:
    base = tmp_path / "base1.img"
    luks.create_image(str(base), SIZE, PW, key_bytes=32, iterations=1000)
    luks.add_key(str(base), PW, b"second", iterations=1000)
    target = Target(base, tmp_path / "work1.img", HEADER_SIZE)
    known = _parsed(target.base)
    count = 0
    try:
        for n, rng in cases(25_000, salt=1):
            header = _luks1_case(rng, target.base)
            if rng.random() < 0.02:  # a truncated image
                short = tmp_path / "short1.img"
                short.write_bytes(header + target.base[len(header) : rng.randrange(8, 4 << 20)])
                _guard(n, functools.partial(check, str(short), n))
                continue
            # A header that parses to exactly the base header opens exactly as the base does
            # (checked below): skip its KDF work.
            same = _parsed(header) == known
            right = rng.random() < 0.05
            run = functools.partial(target.run, n, header, open_wrong=not same, right=right)
            _guard(n, run)
            count += 1
        check(target.path, -1, right=True)
        luks.open_volume(target.path, PW, readonly=True).close()  # the base still opens
    finally:
        target.close()
        _report("LUKS1")
    assert count > 0


# ---- LUKS2 ---------------------------------------------------------------------------------
def _csum(copy: bytearray, hdr_size: int) -> None:
    """Fix the checksum of one header copy (its own algorithm when it names a known one)."""
    alg = copy[72:104].split(b"\0", 1)[0].decode("ascii", "replace")
    copy[448:512] = bytes(64)
    digest = hashlib.new(alg if alg in ("sha256", "sha512", "sha1") else "sha256", copy[:hdr_size])
    copy[448 : 448 + digest.digest_size] = digest.digest()


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if len(prefix) > 40:  # deep nesting we made ourselves: no need to walk all of it
        return
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _value(rng: random.Random, doc: dict[str, Any]) -> Any:
    kind = rng.randrange(8)
    if kind < 3:
        return rng.choice(INTS)
    if kind < 6:
        return rng.choice(STRINGS)
    if kind == 6:
        if rng.random() < 0.2:  # nesting around json-c's limit, or far beyond it
            return _nest(rng.choice((30, 31, 32, 33, 64, 500)))
        return rng.choice((None, True, False, [], {}, ["0"], ["9"], {"0": {}}, 1.5, [[[[]]]]))
    # a copy of another part of the document (a keyslot as a segment, a digest twice...)
    path = rng.choice(list(_paths(doc)))
    node: Any = doc
    for key in path:
        node = node[key]
    return json.loads(json.dumps(node))


def _nest(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def _edit_doc(rng: random.Random, doc: dict[str, Any]) -> None:
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths)
    parent: Any = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    kind = rng.randrange(4)
    if kind == 0 and isinstance(parent, dict):
        del parent[last]
    elif kind == 1 and isinstance(parent, dict):  # the same entry under another id or key
        parent[rng.choice(("1", "2", "31", "32", "007", "\u0663", "", "x", *parent))] = parent[last]
    else:
        parent[last] = _value(rng, doc)


def _rule_edit(rng: random.Random, doc: dict[str, Any]) -> None:
    """Shapes cryptsetup's rules (issue 20) are about: keyslot-digest bindings, flags,
    requirements, segment ids and types, reencrypt keyslots."""
    kind = rng.randrange(7)
    digests, keyslots = doc.get("digests", {}), doc.get("keyslots", {})
    if kind == 0 and digests:  # a keyslot in two digests, or in none
        if rng.random() < 0.5:
            digests[str(len(digests))] = json.loads(json.dumps(next(iter(digests.values()))))
        else:
            rng.choice(list(digests.values()))["keyslots"] = []
    elif kind == 1:
        where = rng.choice((doc.get("segments", {}).get("0", {}), doc.get("config", {})))
        where["flags"] = rng.choice(([], ["x"], [1], "x", [None], ["backup-final"], {}))
    elif kind == 2:
        doc.setdefault("config", {})["requirements"] = rng.choice(
            ("x", {}, {"mandatory": []}, {"mandatory": [1]}, {"mandatory": "x"},
             {"mandatory": ["online-reencrypt-v2"]}, {"mandatory": ["offline-reencrypt"]},
             {"mandatory": ["online-reencrypt", "online-reencrypt-v9"]}, {"mandatory": ["x"]})
        )  # fmt: skip
    elif kind == 3 and "0" in doc.get("segments", {}):  # another id, type or a second segment
        segments = doc["segments"]
        choice = rng.randrange(3)
        if choice == 0:
            segments[rng.choice(("1", "2", "00"))] = segments.pop("0")
        elif choice == 1:
            segments["0"]["type"] = rng.choice(("linear", "crypt ", "", "reencrypt"))
        else:
            segments["1"] = dict(segments["0"], flags=rng.choice((["backup-final"], [])))
    elif kind == 4:
        keyslots[rng.choice(("2", "3"))] = {
            "type": "reencrypt",
            "key_size": rng.choice((1, 2)),
            "mode": rng.choice(("reencrypt", "encrypt", "x")),
            "direction": rng.choice(("forward", "backward", "x")),
            "area": {"type": "none", "offset": rng.choice(("600000", "32768")), "size": "4096"},
        }
    elif kind == 5 and keyslots:  # an area of another size, or of none
        area = rng.choice(list(keyslots.values())).get("area", {})
        area["size"] = rng.choice(("0", "4096", "512", "16777216"))
    else:
        doc.setdefault("tokens", {})["0"] = rng.choice(
            ({"keyslots": []}, {"type": "", "keyslots": []}, {"type": "t", "keyslots": [0]},
             {"type": "t", "keyslots": ["0"]}, {"type": "t", "keyslots": ["9"]})
        )  # fmt: skip


def _area_shape(rng: random.Random, text: bytes, size: int) -> bytes:
    """The JSON area's bytes around the text: what json-c consumes, what it does not."""
    kind = rng.randrange(4)
    if kind == 0:
        text = rng.choice((b" ", b"\n", b"\t", b"\r\n", b"\x0b", b"\x0c", b"\xef\xbb\xbf")) + text
    elif kind == 1:
        text += rng.choice((b" ", b"\n", b" \t\r\n", b"\x0b", b"\x0c", b" x", b"}", b"\x00x"))
    area = bytearray(text[:size].ljust(size, b"\0"))
    if kind >= 2 and len(text) < size - 1:  # a byte after the terminating NUL
        pos = rng.randrange(len(text) + 1, size)
        area[pos] = rng.choice((0, 1, 0x20, 0x7B, 0xFF))
    return bytes(area)


def _lvm_label(device_size: int) -> bytes:
    """An LVM2 physical volume label (sector 1), as tests/disk/test_luks_cryptsetup_rules."""
    pv_header = b"A" * 32 + struct.pack("<Q", device_size) + bytes(64)
    body = (struct.pack("<I", 32) + b"LVM2 001" + pv_header).ljust(512 - 20, b"\0")
    crc = zlib.crc32(body, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    return b"LABELONE" + struct.pack("<QI", 1, crc) + body


def _luks2_copies(rng: random.Random, base: bytes) -> bytes:
    """Both header copies (32 KiB) with one kind of mutation, written back as one buffer."""
    copies = [bytearray(base[:HDR]), bytearray(base[HDR : 2 * HDR])]
    kind = rng.randrange(12)
    text = copies[0][4096:].split(b"\0", 1)[0]
    area: bytes | None = None
    if kind < 5 or kind == 10:  # the JSON as a document
        doc = json.loads(text)
        for _ in range(rng.randint(1, 3)):
            (_rule_edit if kind == 10 else _edit_doc)(rng, doc)
        new = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    elif kind < 8:  # the JSON as text
        new = mutate(rng, text)
        if rng.random() < 0.05:  # nesting deeper than any recursive parser allows
            depth = rng.choice((33, 5000, 100_000))
            deep = b'{"0":{"type":"x","keyslots":[],"d":' + b"[" * depth + b"]" * depth + b"}}"
            new = text.replace(b'"tokens":{}', b'"tokens":' + deep)
    else:
        new = text
        if kind == 11:
            area = _area_shape(rng, text, HDR - 4096)
    for i, copy in enumerate(copies):
        copy[4096:] = area or new[: HDR - 4096].ljust(HDR - 4096, b"\0")
        if kind in (8, 9):  # the binary header: a field edit, or a flip the checksum catches
            off = rng.choice((6, 8, 16, 24, 72, 168, 256, 448, rng.randrange(4096)))
            copy[off : off + 8] = struct.pack(">Q", rng.choice(INTS) & ((1 << 64) - 1))
        if kind != 9 or rng.random() < 0.5:
            size = int.from_bytes(copy[8:16], "big")
            _csum(copy, size if size in (HDR,) else HDR)
        if i == 1 and rng.random() < 0.9:
            copy[:] = copies[0][:8].replace(b"LUKS", b"SKUL") + copy[8:]
    if rng.random() < 0.15:  # only the primary changed: the reader must fall back, or refuse
        copies[1] = bytearray(base[HDR : 2 * HDR])
    if rng.random() < 0.03:  # another owner's label over the primary: ambiguous, refused
        if rng.random() < 0.5:
            copies[0][:512] = bytes(512)
        copies[0][512:1024] = _lvm_label(SIZE + (16 << 20))
    return bytes(copies[0] + copies[1])


@pytest.mark.slow  # ~35 s for its 40,000 cases here
def test_fuzz_luks2_headers(tmp_path: Path) -> None:
    base = tmp_path / "base2.img"
    luks.create_image(
        str(base), SIZE, PW, fmt="luks2", key_bytes=32, pbkdf="pbkdf2", iterations=1000
    )
    luks.add_key(str(base), PW, b"second", pbkdf="pbkdf2", iterations=1000)
    target = Target(base, tmp_path / "work2.img", 2 * HDR)
    try:
        for n, rng in cases(40_000, salt=2):
            header = _luks2_copies(rng, target.base)
            right = rng.random() < 0.05
            _guard(n, functools.partial(target.run, n, header, right=right))
        check(target.path, -1, right=True)
        luks.open_volume(target.path, PW, readonly=True).close()  # the base still opens
    finally:
        target.close()
        _report("LUKS2")


def _cryptsetup_loads(path: str) -> bool:
    """cryptsetup luksDump (no locks: it then never writes a recovered copy back)."""
    dump = subprocess.run(
        ["cryptsetup", "luksDump", "--disable-locks", path], capture_output=True, timeout=60
    )
    return dump.returncode == 0


@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="needs cryptsetup")
def test_fuzz_luks2_what_cryptsetup_refuses_vmshield_refuses(tmp_path: Path) -> None:
    """Differential: a mutated header cryptsetup 2.6 refuses is never described by vmshield.

    (vmshield may refuse more: a header it cannot serve is "not supported", or stricter.)
    """
    base = tmp_path / "base3.img"
    luks.create_image(
        str(base), SIZE, PW, fmt="luks2", key_bytes=32, pbkdf="pbkdf2", iterations=1000
    )
    luks.add_key(str(base), PW, b"second", pbkdf="pbkdf2", iterations=1000)
    target = Target(base, tmp_path / "work3.img", 2 * HDR)
    outcomes: dict[tuple[bool, bool], int] = {}
    try:
        for n, rng in cases(200, salt=3):
            os.pwrite(target.fd, _luks2_copies(rng, target.base), 0)
            try:
                try:
                    luks.info(target.path)
                    ours = True
                except VmshieldError:
                    ours = False
                theirs = _cryptsetup_loads(target.path)
                outcomes[ours, theirs] = outcomes.get((ours, theirs), 0) + 1
                assert theirs or not ours, f"cryptsetup refuses, vmshield accepts: {where(n)}"
            finally:
                os.pwrite(target.fd, target.base, 0)
    finally:
        target.close()
        print(f"\n(vmshield, cryptsetup) accepts: {outcomes}")
    assert outcomes.get((True, True), 0) > 0 and outcomes.get((False, False), 0) > 0
