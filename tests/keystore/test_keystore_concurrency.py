"""Several processes writing one keystore at once: nothing lost, chain intact, or a clear
"busy" error; and the lockout refuses without running the verifier."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from keystore.auth import AuthPolicy
from keystore.errors import AccountLocked, AuthenticationFailed
from keystore.sqlite import audit
from keystore.sqlite import connection as dbmod
from keystore.sqlite.repository import SqliteRepository
from tests.keystore.test_keystore_sqlite import FAST

WRITER = r"""
import asyncio, sys
from keystore.sqlite.audit import append_audit
from keystore.sqlite.repository import SqliteRepository
from keystore.models import UsbAction

path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def main():
    repo = await SqliteRepository.open(path)
    try:
        for i in range(n):
            await repo.add_usb_rule("web1", UsbAction.ALLOW, i, int(tag), actor=tag)
            append_audit(path, tag, "test.sync", "web1", {"i": i})
    finally:
        await repo.close()

asyncio.run(main())
"""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ks.db"
    dbmod.initialise(path)

    async def setup() -> None:
        async with await SqliteRepository.open(path, policy=FAST) as r:
            await r.add_principal("alice", b"password-1", actor="t")
            await r.add_vm("web1", "alice", actor="t")

    asyncio.run(setup())
    return path


def test_concurrent_writers_lose_nothing(db: Path) -> None:
    n, writers = 40, 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(t), str(n)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for t in range(1, writers + 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    rules = asyncio.run(_rules(db))
    assert sorted(rules) == sorted((i, t) for t in range(1, writers + 1) for i in range(n))
    result = audit.verify(db)
    assert result.ok, result.problems
    assert result.rows == 2 + 2 * n * writers  # user.add, vm.add, then every write
    # positions stay a dense 1..N sequence even with interleaved inserts
    assert [r.position for r in asyncio.run(_rule_objs(db))] == list(range(1, n * writers + 1))


async def _rule_objs(db: Path) -> list[object]:
    async with await SqliteRepository.open(db) as r:
        return list(await r.list_usb_rules("web1"))


async def _rules(db: Path) -> list[tuple[int, int]]:
    async with await SqliteRepository.open(db) as r:
        return [(x.vendor_id or 0, x.product_id or 0) for x in await r.list_usb_rules("web1")]


def test_cli_writers_at_once_succeed_or_say_busy(db: Path) -> None:
    """Two `vmshield` processes adding VMs at the same moment."""
    vmshield = str(Path(sys.executable).parent / "vmshield")
    procs = [
        subprocess.Popen(
            [vmshield, "vm", "add", f"vm{i}", "--owner", "alice", "--db", str(db)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        outcomes.append((p.returncode, out, err))
    for code, out, err in outcomes:
        assert code == 0 or (code == 75 and "busy" in err), (code, out, err)
    listed = subprocess.run(
        [vmshield, "vm", "list", "--json", "--db", str(db)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {v["name"] for v in json.loads(listed)}
    assert {f"vm{i}" for i, (c, _, _) in enumerate(outcomes) if c == 0} <= names
    assert audit.verify(db).ok


class CountingPolicy(AuthPolicy):
    calls = 0

    def verify(self, verifier: str, password: bytes) -> bool:
        CountingPolicy.calls += 1
        return super().verify(verifier, password)


def test_locked_account_is_refused_without_checking(db: Path) -> None:
    policy = CountingPolicy(hasher=FAST.hasher)

    async def go() -> None:
        async with await SqliteRepository.open(db, policy=policy) as r:
            for _ in range(5):
                with pytest.raises(AuthenticationFailed):
                    await r.authenticate("alice", b"wrong", actor="t")
            assert CountingPolicy.calls == 5
            for pw in (b"wrong", b"password-1"):
                with pytest.raises(AccountLocked):
                    await r.authenticate("alice", pw, actor="t")
            assert CountingPolicy.calls == 5  # the verifier never ran while locked

    asyncio.run(go())
