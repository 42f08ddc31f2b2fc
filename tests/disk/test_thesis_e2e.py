"""The thesis experiment, automated: a real Linux guest writes a marker to its disk.

Served by nbdkit's plain file plugin, the marker lands in the clear in the image file: whoever
copies the file reads it (the vulnerability). Served by our plugin from a LUKS1 container (made
by cryptsetup, and by our own create_image), the file holds only ciphertext, yet the plaintext is
there for the key holder: decrypted by our plugin, independently by nbdkit's own luks filter
(byte for byte the same), and read back by the guest itself. See scripts/lab/guest.py for the
layout.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from scripts.lab.guest import (
    DISK_SIZE,
    FS_BYTES,
    MARKER,
    PLUGIN,
    RAW_OFFSET,
    Boot,
    Guest,
    boot,
    build_guest,
    make_luks1_image,
    nbdkit,
    read_export,
    write_secret,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.qemu,
    pytest.mark.skipif(
        not (shutil.which("qemu-system-x86_64") and shutil.which("nbdkit")),
        reason="needs qemu-system-x86_64 and nbdkit",
    ),
]

PASSPHRASE = b"correct horse battery staple"
EXT2_MAGIC_AT = 1024 + 56  # s_magic in the superblock, 1 KiB into the filesystem
EXT2_MAGIC = b"\x53\xef"
SECTOR = 512


def payload_offset(image: Path) -> int:
    """LUKS1 phdr: magic[6] version u16 cipher-name[32] cipher-mode[32] hash-spec[32], then
    payload-offset u32 big-endian, in 512-byte sectors (read here, not through our code)."""
    with image.open("rb") as f:
        head = f.read(108)
    assert head[:6] == b"LUKS\xba\xbe" and head[6:8] == b"\x00\x01", "not a LUKS1 header"
    return int.from_bytes(head[104:108], "big") * SECTOR


def assert_marker_layout(disk: bytes) -> None:
    """The guest's writes, as it made them: ext2 with the marker file, and the raw marker."""
    assert disk[EXT2_MAGIC_AT : EXT2_MAGIC_AT + 2] == EXT2_MAGIC, "no ext2 superblock"
    assert MARKER + b"\n" in disk[:FS_BYTES], "marker file content not in the filesystem"
    assert disk[RAW_OFFSET : RAW_OFFSET + len(MARKER)] == MARKER, "raw marker not at 48 MiB"


@pytest.fixture(scope="module")
def guest() -> Guest:
    return build_guest()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="vms-e2e-"))  # short: unix socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- the vulnerability: a plain image file --------------------------------------------------


def test_plain_file_plugin_leaks_the_marker(guest: Guest, workdir: Path) -> None:
    img = workdir / "plain.img"
    with img.open("wb") as f:
        f.truncate(DISK_SIZE)
    with nbdkit("file", str(img), sockdir=workdir) as sock:
        run = boot(guest, sock, "write")
    assert run.done, run.console

    assert_marker_layout(img.read_bytes())  # anyone who can read the file reads the marker


# --- the fix: a LUKS container served by our plugin ----------------------------------------


@dataclass(frozen=True)
class Encrypted:
    image: Path
    keyfile: Path
    wrote: Boot  # the guest's write boot through our plugin


def serve_plugin(
    image: Path, keyfile: Path, sockdir: Path, *, readonly: bool = False
) -> AbstractContextManager[str]:
    ro = ["-r"] if readonly else []
    return nbdkit(
        *ro, "python", PLUGIN, f"image={image}", f"passphrase=+{keyfile}", sockdir=sockdir
    )


@pytest.fixture(scope="module", params=["cryptsetup", "vmshield"])
def encrypted(request: pytest.FixtureRequest, guest: Guest, workdir: Path) -> Encrypted:
    """A LUKS1 image made by cryptsetup (or by us), then written by the guest via our plugin."""
    maker = request.param
    keyfile = workdir / f"passphrase-{maker}"
    write_secret(keyfile, PASSPHRASE)
    image = workdir / f"disk-{maker}.luks"
    if maker == "cryptsetup":
        make_luks1_image(image, keyfile, DISK_SIZE)
    else:
        from nbd_plugin.luks import create_image

        create_image(str(image), DISK_SIZE, PASSPHRASE, fmt="luks1", iterations=1000)
    with serve_plugin(image, keyfile, workdir) as sock:
        wrote = boot(guest, sock, "write")
    return Encrypted(image, keyfile, wrote)


@pytest.fixture(scope="module")
def decrypted(encrypted: Encrypted, workdir: Path) -> bytes:
    """The plaintext disk as our plugin serves it (read-only)."""
    assert encrypted.wrote.done, encrypted.wrote.console
    with serve_plugin(encrypted.image, encrypted.keyfile, workdir, readonly=True) as sock:
        return read_export(sock)


def test_guest_writes_through_the_plugin(encrypted: Encrypted) -> None:
    assert encrypted.wrote.done, encrypted.wrote.console


def test_ciphertext_holds_no_marker(encrypted: Encrypted) -> None:
    assert encrypted.wrote.done, encrypted.wrote.console
    data = encrypted.image.read_bytes()
    assert data.startswith(b"LUKS\xba\xbe"), "not a LUKS container any more"
    assert MARKER not in data
    # Not even a fragment of it: every 8-byte window of the marker is absent.
    fragments = [MARKER[i : i + 8] for i in range(len(MARKER) - 7)]
    assert [f for f in fragments if f in data] == []
    # The guest did write there: the payload is not zeros where the raw marker went,
    # and no ext2 superblock shows through.
    payload = data[payload_offset(encrypted.image) :]
    assert len(payload) >= DISK_SIZE
    assert payload[RAW_OFFSET : RAW_OFFSET + 512] != bytes(512)
    assert payload[EXT2_MAGIC_AT : EXT2_MAGIC_AT + 2] != EXT2_MAGIC


def test_plugin_decrypts_the_marker(decrypted: bytes) -> None:
    assert len(decrypted) == DISK_SIZE
    assert_marker_layout(decrypted)


def test_nbdkit_luks_filter_decrypts_the_same_plaintext(
    encrypted: Encrypted, decrypted: bytes, workdir: Path
) -> None:
    """An implementation that is not ours reads what our plugin wrote, byte for byte."""
    with nbdkit(
        "-r", "--filter=luks", "file", str(encrypted.image),
        f"passphrase=+{encrypted.keyfile}", sockdir=workdir,
    ) as sock:  # fmt: skip
        disk = read_export(sock)
    assert len(disk) == DISK_SIZE
    assert_marker_layout(disk)

    # Sectors never written are holes in the ciphertext file: our plugin serves them as zeros,
    # the luks filter decrypts the zeros into noise. Every sector that holds ciphertext must
    # decrypt the same in both; every other sector is zeros from us or the filter's noise.
    payload = encrypted.image.read_bytes()[payload_offset(encrypted.image) :][:DISK_SIZE]
    cipher = np.frombuffer(payload, np.uint8).reshape(-1, SECTOR)
    theirs = np.frombuffer(disk, np.uint8).reshape(-1, SECTOR)
    ours = np.frombuffer(decrypted, np.uint8).reshape(-1, SECTOR)
    written = cipher.any(axis=1)
    assert cipher[RAW_OFFSET // SECTOR].any(), "the raw marker's sector holds no ciphertext"
    same = (theirs == ours).all(axis=1)
    zeros = ~ours.any(axis=1)
    assert np.flatnonzero(written & ~same).tolist() == [], "plaintexts disagree"
    assert np.flatnonzero(~written & ~same & ~zeros).tolist() == [], "holes misread"


# One guest read-back is enough (the plugin's read path does not depend on who made the image);
# each boot costs ~5 s of TCG, more on a busy machine.
@pytest.mark.parametrize("encrypted", ["cryptsetup"], indirect=True)
def test_guest_reads_the_marker_back(guest: Guest, encrypted: Encrypted, workdir: Path) -> None:
    assert encrypted.wrote.done, encrypted.wrote.console
    with serve_plugin(encrypted.image, encrypted.keyfile, workdir) as sock:
        run = boot(guest, sock, "read")
    assert run.done, run.console
    assert run.value("VMSHIELD-FILE") == MARKER.decode()
    assert run.value("VMSHIELD-RAW") == MARKER.decode()
