"""Issue 20 B1: erase does not certify Purge over extents a reflinked copy shares.

On XFS with reflink, `cp --reflink` makes a copy that shares the image's blocks: overwriting
the image writes new blocks (copy-on-write) and the copy keeps the LUKS header and keyslots,
so it still opens with the passphrase. The erase must stop before anything irreversible and
name the copy. A real XFS is made on a loop-mounted file (xfsprogs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from keystore.cli import main
from tests.support.erase import MIB, make_luks, opens
from tests.support.faults import can_mount

pytestmark = pytest.mark.skipif(not can_mount(), reason="needs root and loop devices")


@contextmanager
def xfs_with_reflink() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="vmsxfs", dir="/var/tmp"))
    backing, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    with backing.open("wb") as f:
        f.truncate(320 * MIB)  # XFS's smallest size is 300 MiB; sparse
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(backing)], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def erase(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["image", "erase", *args, "-m", "zero", "--yes"])
    return r.exit_code, r.output


def test_an_image_whose_blocks_a_reflinked_copy_shares_is_not_erased() -> None:
    with xfs_with_reflink() as fs:
        img, copy = fs / "disk.img", fs / "backup-copy.img"
        make_luks(img, size=8 * MIB)
        subprocess.run(["cp", "--reflink=always", str(img), str(copy)], check=True)
        before = img.read_bytes()
        code, out = erase(str(img))
        assert code != 0 and len(out.strip().splitlines()) == 1, out
        assert "backup-copy.img" in out and "shares" in out, out
        assert img.read_bytes() == before and opens(img)  # nothing irreversible happened
        assert opens(copy)
        # --force erases this file anyway, and the certificate does not say Purge
        code, out = erase(str(img), "--force", "--json")
        assert code == 0, out
        cert = json.loads(out.strip().splitlines()[-1])
        got = json.dumps(cert)
        assert '"category": "Purge"' not in got and "not assured" in got, got
