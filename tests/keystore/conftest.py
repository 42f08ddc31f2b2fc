"""Fixtures of the keystore tests: a throwaway SQLite keystore driven through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from keystore.sqlite import repository as sqlite_repo
from tests.support.cli import FAST, PW, vms


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty keystore path (VMSHIELD_DB points at it), verifiers made with FAST."""
    path = tmp_path / "ks.db"
    monkeypatch.setenv("VMSHIELD_DB", str(path))
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    return path


@pytest.fixture
def ready(db: Path) -> Path:
    """An initialised keystore with user alice (password PW) and her VM web1."""
    vms("init")
    vms("user", "add", "alice", input=PW + "\n")
    vms("vm", "add", "web1", "--owner", "alice")
    return db
