"""Interoperability, byte for byte, with cryptsetup, QEMU's luks driver and nbdkit's luks filter."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.nbd import (
    cryptsetup_format,
    cryptsetup_opens,
    filter_args,
    nbdkit,
    qemu_create_luks,
    qemu_read_luks,
    qemu_write_luks,
    read_at,
    serve_plugin,
    write_at,
    write_secret,
)

SIZE = 16 << 20
VMSHIELD = [str(ROOT / ".venv" / "bin" / "vmshield")]


def pattern(size: int = SIZE) -> bytes:
    return os.urandom(size)


def vmshield(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMSHIELD, *args], capture_output=True, text=True, timeout=120)


def vmshield_create(image: Path, keyfile: Path, *opts: str) -> None:
    r = vmshield(
        "image",
        "create",
        str(image),
        "--size",
        str(SIZE),
        "--passphrase-file",
        str(keyfile),
        "--pbkdf-iterations",
        "1000",
        "--format",  # new images are LUKS2 by default; these must open in QEMU's driver
        "luks1",
        *opts,
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("key_size", "hash_name"), [("512", "sha256"), ("256", "sha1"), ("512", "sha512")]
)
def test_cryptsetup_image_written_by_luks_filter_reads_identical(
    tmp_path: Path, keyfile: Path, sockdir: Path, key_size: str, hash_name: str
) -> None:
    image = tmp_path / "cs.img"
    cryptsetup_format(image, keyfile, SIZE, "--cipher", "aes-xts-plain64", "--key-size", key_size,
                      "--hash", hash_name)  # fmt: skip
    data = pattern()
    with nbdkit(*filter_args(image, keyfile), sockdir=sockdir) as sock:
        write_at(sock, data)
    with serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-r",)) as sock:
        assert read_at(sock, SIZE) == data


def test_qemu_img_image_written_by_luks_filter_reads_identical(
    tmp_path: Path, keyfile: Path, sockdir: Path
) -> None:
    image = tmp_path / "q.img"
    qemu_create_luks(image, keyfile, SIZE)
    data = pattern()
    with nbdkit(*filter_args(image, keyfile), sockdir=sockdir) as sock:
        write_at(sock, data)
    with serve_plugin(image, keyfile, sockdir) as sock:
        assert read_at(sock, SIZE) == data


def test_written_by_plugin_reads_identical_in_luks_filter_and_qemu(
    tmp_path: Path, keyfile: Path, sockdir: Path
) -> None:
    image = tmp_path / "ours.img"
    vmshield_create(image, keyfile)
    data = pattern()
    with serve_plugin(image, keyfile, sockdir) as sock:
        write_at(sock, data)
    with nbdkit(*filter_args(image, keyfile), sockdir=sockdir) as sock:
        assert read_at(sock, SIZE) == data
    out = tmp_path / "plain.raw"
    qemu_read_luks(image, keyfile, out)
    assert out.read_bytes() == data


def test_vmshield_image_passes_cryptsetup_and_keyslot_changes_agree(
    tmp_path: Path, keyfile: Path
) -> None:
    image = tmp_path / "v.img"
    vmshield_create(image, keyfile)
    dump = subprocess.run(
        ["cryptsetup", "luksDump", str(image)], capture_output=True, text=True, check=True
    )
    assert "Version:       \t1" in dump.stdout and "xts-plain64" in dump.stdout
    assert cryptsetup_opens(image, keyfile)

    second = tmp_path / "second"
    write_secret(second, b"second passphrase")
    r = vmshield(
        "image",
        "add-key",
        str(image),
        "--passphrase-file",
        str(keyfile),
        "--new-passphrase-file",
        str(second),
        "--pbkdf-iterations",
        "1000",
    )
    assert r.returncode == 0, r.stderr
    assert cryptsetup_opens(image, second)

    # A keyslot cryptsetup adds works for us, and one we remove is gone for cryptsetup.
    third = tmp_path / "third"
    write_secret(third, b"third passphrase")
    subprocess.run(
        [
            "cryptsetup",
            "luksAddKey",
            "--batch-mode",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            str(keyfile),
            str(image),
            str(third),
        ],
        check=True,
        capture_output=True,
    )
    r = vmshield("image", "test-passphrase", str(image), "--passphrase-file", str(third))
    assert r.returncode == 0, r.stderr
    r = vmshield("image", "remove-key", str(image), "--passphrase-file", str(keyfile))
    assert r.returncode == 0, r.stderr
    assert not cryptsetup_opens(image, keyfile)

    renewed = tmp_path / "renewed"
    write_secret(renewed, b"renewed passphrase")
    r = vmshield(
        "image",
        "passwd",
        str(image),
        "--passphrase-file",
        str(second),
        "--new-passphrase-file",
        str(renewed),
        "--pbkdf-iterations",
        "1000",
    )
    assert r.returncode == 0, r.stderr
    assert cryptsetup_opens(image, renewed)
    assert not cryptsetup_opens(image, second)
    assert cryptsetup_opens(image, third)

    # QEMU and nbdkit's filter agree with cryptsetup on the renewed passphrase.
    out = tmp_path / "plain.raw"
    qemu_read_luks(image, renewed, out)
    assert out.stat().st_size == SIZE


def test_vmshield_image_opens_in_luks_filter(tmp_path: Path, keyfile: Path, sockdir: Path) -> None:
    image = tmp_path / "f.img"
    vmshield_create(image, keyfile)
    data = pattern(1 << 20)
    with nbdkit(*filter_args(image, keyfile), sockdir=sockdir) as sock:
        write_at(sock, data, 4096)
    with serve_plugin(image, keyfile, sockdir) as sock:
        assert read_at(sock, len(data), 4096) == data


@pytest.mark.parametrize(
    "qemu_opts",
    [
        ("cipher-alg=aes-256", "cipher-mode=cbc", "ivgen-alg=essiv", "ivgen-hash-alg=sha256"),
        ("cipher-alg=aes-256", "cipher-mode=cbc", "ivgen-alg=plain64"),
        ("cipher-alg=aes-128", "cipher-mode=xts", "ivgen-alg=plain64"),
    ],
    ids=["cbc-essiv-sha256", "cbc-plain64", "xts-aes128"],
)
def test_qemu_written_cbc_and_xts_variants_read_identical(
    tmp_path: Path, keyfile: Path, sockdir: Path, qemu_opts: tuple[str, ...]
) -> None:
    image = tmp_path / "cbc.img"
    qemu_create_luks(image, keyfile, 4 << 20, *qemu_opts)
    raw = tmp_path / "src.raw"
    data = pattern(4 << 20)
    raw.write_bytes(data)
    qemu_write_luks(image, keyfile, raw)
    with serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-r",)) as sock:
        assert read_at(sock, len(data)) == data


def test_cbc_essiv_written_by_plugin_reads_in_qemu(
    tmp_path: Path, keyfile: Path, sockdir: Path
) -> None:
    image = tmp_path / "essiv.img"
    qemu_create_luks(
        image,
        keyfile,
        2 << 20,
        "cipher-alg=aes-256",
        "cipher-mode=cbc",
        "ivgen-alg=essiv",
        "ivgen-hash-alg=sha256",
    )
    data = pattern(2 << 20)
    with serve_plugin(image, keyfile, sockdir) as sock:
        write_at(sock, data)
    out = tmp_path / "out.raw"
    qemu_read_luks(image, keyfile, out)
    assert out.read_bytes() == data
