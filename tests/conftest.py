"""Fixtures shared by every test module."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (paths are limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vms", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    """A passphrase file (mode 0600, no trailing newline) holding tests.support.nbd.SECRET."""
    from tests.support.nbd import SECRET, write_secret

    path = tmp_path / "key"
    write_secret(path, SECRET)
    return path


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[object]:
    """One real PostgreSQL cluster for the whole session (tests/support/postgres.py)."""
    from tests.support.postgres import running_cluster

    with running_cluster() as cluster:
        yield cluster
