"""`Keystore.run(..., blocking=True)`: a step on SQLite's blocking connection, no event loop.

The USB rule commands run this way (issue 26 item 15); the repository's code is the one the
event loop runs (tests/keystore/test_keystore_sqlite.py runs its whole contract on both)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from keystore.models import UsbAction
from keystore.repository import Repository
from keystore.services.store import Keystore
from keystore.sqlite import connection as dbmod
from keystore.sqlite import repository as sqlite_repo
from tests.support.cli import FAST


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Keystore:
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    db = tmp_path / "ks.db"
    dbmod.initialise(db)
    ks = Keystore(db)
    ks.run(lambda r: r.add_principal("alice", b"s3cret-horse-battery", actor="test"))
    ks.run(lambda r: r.add_vm("web1", "alice", actor="test"))
    return ks


def test_a_blocking_step_commits_through_the_repository(store: Keystore) -> None:
    async def block(repo: Repository) -> list[str]:
        await repo.add_usb_rule("web1", UsbAction.BLOCK, 0x0781, 0x5567, actor="test")
        return [r.describe() for r in await repo.list_usb_rules("web1")]

    assert store.run(block, blocking=True) == ["block id 0781:5567"]
    seen = store.run(lambda r: r.list_audit("web1"))  # the event loop's connection sees it
    assert [e.action for e in seen][-1] == "usb.rule.add"


def test_a_blocking_step_that_waits_on_anything_else_is_refused(store: Keystore) -> None:
    """A step that would need the event loop fails loudly, its change rolled back, instead of
    returning half-run."""

    async def waits(repo: Repository) -> str:
        async with repo.conn.write():  # type: ignore[attr-defined]
            await repo.conn.run(  # type: ignore[attr-defined]
                "DELETE FROM usb_rules WHERE vm_uuid IN (SELECT uuid FROM vms)"
            )
            await asyncio.sleep(0)
        return "done"

    store.run(lambda r: r.add_usb_rule("web1", UsbAction.ALLOW, 1, 2, actor="t"), blocking=True)
    with pytest.raises(RuntimeError, match="awaited something other than the keystore"):
        store.run(waits, blocking=True)
    assert len(store.run(lambda r: r.list_usb_rules("web1"), blocking=True)) == 1
