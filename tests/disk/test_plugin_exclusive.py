"""Issue 12 #7: one read-write server per image, also through a loop device over it."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faults import can_mount, loop_device
from tests.support.nbd import (
    luks1_image,
    plugin_args,
    read_at,
    run_nbdkit_expect_failure,
    serve_plugin,
)

SIZE = 4 << 20


pytestmark = pytest.mark.skipif(not can_mount(), reason="needs root and loop devices")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return luks1_image(tmp_path, SIZE)


@pytest.fixture
def loop(image: Path) -> Iterator[Path]:
    with loop_device(image) as dev:
        yield dev


def test_file_behind_a_loop_device_is_refused_read_write(
    image: Path, loop: Path, keyfile: Path, sockdir: Path
) -> None:
    r = run_nbdkit_expect_failure(plugin_args(image, keyfile))
    assert r.returncode != 0
    assert f"attached to {loop}" in r.stderr
    assert "Traceback" not in r.stderr
    # read-only stays possible
    with serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-r",)) as sock:
        assert len(read_at(sock, 4096)) == 4096


def test_loop_device_refused_while_its_file_is_served(
    image: Path, keyfile: Path, sockdir: Path
) -> None:
    with serve_plugin(image, keyfile, sockdir), loop_device(image) as dev:
        r = run_nbdkit_expect_failure(plugin_args(dev, keyfile))
    assert r.returncode != 0
    assert f"loop device over {image}" in r.stderr, r.stderr


def test_loop_server_claims_the_device_exclusively(
    image: Path, loop: Path, keyfile: Path, sockdir: Path
) -> None:
    with serve_plugin(loop, keyfile, sockdir) as sock:
        assert len(read_at(sock, 4096)) == 4096
        with pytest.raises(OSError) as exc:
            os.close(os.open(loop, os.O_RDONLY | os.O_EXCL))
        assert exc.value.errno == errno.EBUSY
    os.close(os.open(loop, os.O_RDONLY | os.O_EXCL))  # released when the server stopped
