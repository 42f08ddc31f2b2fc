"""Rule sources and audit sinks: text file, memory, and the real keystore (data_version)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.models import UsbAction
from keystore.sqlite import audit as keystore_audit
from keystore.sqlite.connection import initialise
from keystore.sqlite.repository import SqliteRepository
from usbgate.errors import RuleSourceError
from usbgate.rules.policy import Action, Rule, parse_rule
from usbgate.sources import FileRuleSource, MemoryRuleSource
from usbgate.sources.keystore import KeystoreAuditSink, KeystoreRuleSource

FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


def test_file_rule_source_sees_atomic_replacement(tmp_path: Path) -> None:
    path = tmp_path / "rules"
    path.write_text("allow id 0781:5567\n")
    source = FileRuleSource(path)
    assert source.load("any") == [Rule(Action.ALLOW, 0x0781, 0x5567)]
    assert source.poll("any") is None
    tmp = tmp_path / "rules.new"
    tmp.write_text("block id *:*\n")
    os.replace(tmp, path)
    assert source.poll("any") == [Rule(Action.BLOCK)]
    path.write_text("allow nonsense\n")
    with pytest.raises(RuleSourceError, match="rules file"):
        source.poll("any")


def test_memory_rule_source_reports_each_change_once() -> None:
    source = MemoryRuleSource()
    assert source.load("vm") == []
    source.set("vm", [Rule(Action.BLOCK)])
    assert source.poll("vm") == [Rule(Action.BLOCK)]
    assert source.poll("vm") is None


def _repo_do(db: Path, *steps: str) -> None:
    async def go() -> None:
        repo = await SqliteRepository.open(db, policy=FAST)
        try:
            for step in steps:
                if step == "user":
                    await repo.add_principal("alice", b"pw", actor="t")
                elif step == "vm":
                    await repo.add_vm("web1", "alice", actor="t")
                elif step == "rm-vm":
                    await repo.remove_vm("web1", actor="t")
                elif step.startswith("allow "):
                    vid = int(step.split()[1], 16)
                    await repo.add_usb_rule("web1", UsbAction.ALLOW, vid, None, actor="t")
        finally:
            await repo.close()

    asyncio.run(go())


@pytest.fixture
def keystore_db(tmp_path: Path) -> Path:
    db = tmp_path / "k.db"
    initialise(db)
    _repo_do(db, "user", "vm", "allow 0781")
    return db


def texts(rules: list[Rule] | None) -> list[Rule]:
    """The rules as plain policy rules (a stored rule also carries its row id and position)."""
    assert rules is not None
    return [parse_rule(str(r)) for r in rules]


def test_keystore_rule_source_sees_other_processes_commits(keystore_db: Path) -> None:
    source = KeystoreRuleSource(keystore_db)
    assert texts(source.load("web1")) == [Rule(Action.ALLOW, 0x0781)]
    assert source.poll("web1") is None
    _repo_do(keystore_db, "allow 046d")  # another connection commits
    assert texts(source.poll("web1")) == [Rule(Action.ALLOW, 0x0781), Rule(Action.ALLOW, 0x046D)]
    assert source.poll("web1") is None
    started = time.perf_counter()
    for _ in range(1000):
        source.poll("web1")
    per_poll_us = (time.perf_counter() - started) * 1000
    print(f"\nidle poll (PRAGMA data_version): {per_poll_us:.1f} us")
    source.close()


def test_keystore_rule_source_vm_removed_then_back(keystore_db: Path) -> None:
    source = KeystoreRuleSource(keystore_db)
    source.load("web1")
    _repo_do(keystore_db, "rm-vm")
    with pytest.raises(RuleSourceError, match="web1"):
        source.poll("web1")
    with pytest.raises(RuleSourceError):
        source.poll("web1")  # still gone
    _repo_do(keystore_db, "vm", "allow 0781")
    assert texts(source.poll("web1")) == [Rule(Action.ALLOW, 0x0781)]
    source.close()
    with pytest.raises(RuleSourceError, match="nosuchvm"):
        KeystoreRuleSource(keystore_db).load("nosuchvm")


def test_keystore_audit_sink_appends_to_the_chain(keystore_db: Path) -> None:
    sink = KeystoreAuditSink(keystore_db)
    sink.record("usb.allowed", "web1", {"device": {"vid_pid": "0781:5567"}, "slot": 0})
    sink.record("usb.revoked", "web1", {"latency_ms": 1.5})
    asyncio.run(sink.aclose())
    with sqlite3.connect(keystore_db) as conn:
        rows = conn.execute("SELECT actor, action, vm, detail FROM audit WHERE actor = 'usbgate'"
                            " ORDER BY seq").fetchall()  # fmt: skip
    assert [(a, b, c) for a, b, c, _ in rows] == [
        ("usbgate", "usb.allowed", "web1"), ("usbgate", "usb.revoked", "web1"),
    ]  # fmt: skip
    detail = json.loads(rows[1][3])
    assert detail["latency_ms"] == 1.5  # the audit adds who ran it (os_uid, os_user)
    assert set(detail) <= {"latency_ms", "os_uid", "os_user"}
    assert keystore_audit.verify(keystore_db).ok
