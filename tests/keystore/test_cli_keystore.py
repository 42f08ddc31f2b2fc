"""The `vmshield` command surface for the keystore (CliRunner, in process)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest

from keystore.auth import AuthPolicy
from keystore.cli import main
from keystore.sqlite import connection as dbmod
from keystore.sqlite import repository as sqlite_repo
from tests.support.cli import PW, js, vms


def test_every_command_has_help() -> None:
    def walk(cmd: click.Command, path: list[str]) -> list[list[str]]:
        out = [path]
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None, name
                out += walk(sub, [*path, name])
        return out

    paths = walk(main, [])
    assert ["disk", "serve"] in paths and ["usb", "allow"] in paths and ["audit", "verify"] in paths
    for path in paths:
        text = vms(*path, "--help").output
        cmd: click.Command | None = main
        for p in path:
            assert isinstance(cmd, click.Group)
            cmd = cmd.get_command(click.Context(cmd), p)
        assert cmd is not None
        assert len(text) > 150, path
        assert cmd.help and len(cmd.help) > 30, f"{path} needs a real description"


def test_init_creates_0600_and_is_idempotent(db: Path) -> None:
    assert "created keystore" in vms("init").output
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert "up to date" in vms("init").output
    assert js("audit")[0]["action"] == "keystore.init"


def test_db_option_overrides_env(db: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    vms("init", "--db", str(other))
    assert other.exists() and not db.exists()


def test_db_before_the_command_as_virsh_c(db: Path, tmp_path: Path) -> None:
    """`vmshield --db X COMMAND` (issue 26 item 13): it wins over VMSHIELD_DB, agrees with
    the command's own --db, and a second, different --db is refused, not silently chosen."""
    other = tmp_path / "other.db"
    vms("--db", str(other), "init")
    assert other.exists() and not db.exists()
    vms("--db", str(other), "user", "add", "bob", input=PW + "\n")
    assert [u["name"] for u in js("--db", str(other), "user", "list")] == ["bob"]
    assert [u["name"] for u in js("--db", str(other), "user", "list", "--db", str(other))] == [
        "bob"
    ]
    r = vms("--db", str(other), "user", "list", "--db", str(db), code=2)
    assert "--db given twice" in r.output
    vms("user", "list", code=1)  # VMSHIELD_DB still names the keystore that does not exist
    installed = Path(sys.executable).parent / "vmshield"
    p = subprocess.run(
        [str(installed), "--db", str(other), "vm", "list", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "VMSHIELD_DB": str(db)},
        timeout=60,
        check=False,
    )
    assert p.returncode == 0 and json.loads(p.stdout) == [], p.stderr


def test_missing_db_message_names_path(db: Path) -> None:
    r = vms("vm", "list", code=1)
    assert str(db) in r.output and "does not exist" in r.output and "vmshield init" in r.output


def test_unusable_db_path_message(tmp_path: Path, db: Path) -> None:
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "ks.db"
    r = vms("init", "--db", str(bad), code=1)
    assert str(bad) in r.output and "not a directory" in r.output
    r = vms("user", "list", "--db", str(tmp_path), code=2)
    assert "is a directory" in r.output


def test_user_add_list_never_shows_verifier(ready: Path) -> None:
    users = js("user", "list")
    assert [u["name"] for u in users] == ["alice"]
    assert "verifier" not in users[0] and "argon2" not in json.dumps(users)
    vms("user", "add", "alice", input=PW + "\n", code=1)
    r = vms("user", "add", "bob", input="short\n", code=1)
    assert "too short" in r.output


def test_user_add_from_password_file(ready: Path, tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_bytes(b"from-a-file-123\n")
    r = vms("user", "add", "bob", "--password-file", str(f), code=1)
    assert "newline" in r.output
    f.write_bytes(b"from-a-file-123")
    vms("user", "add", "bob", "--password-file", str(f))
    vms("vm", "add", "db1", "--owner", "bob")


def test_production_verifier_is_argon2id_rfc9106(
    ready: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", AuthPolicy)
    vms("user", "add", "carol", input=PW + "\n")
    with sqlite3.connect(ready) as c:
        verifier = c.execute("SELECT verifier FROM principals WHERE name='carol'").fetchone()[0]
    assert verifier.startswith("$argon2id$v=19$m=65536,t=3,p=4$")


def test_vm_add_list_show_remove(ready: Path) -> None:
    vms(
        "vm",
        "add",
        "web2",
        "--owner",
        "alice",
        "--uuid",
        "12345678-1234-5678-1234-567812345678",
        "--pool-uuid",
        "22345678-1234-5678-1234-567812345678",
    )
    listed = js("vm", "list")
    assert [v["name"] for v in listed] == ["web1", "web2"]
    assert listed[1]["uuid"] == "12345678-1234-5678-1234-567812345678"
    shown = js("vm", "show", "web2")
    assert shown["erase_permission"] == {"vm": "web2", "deep_erase": True, "normal_delete": False}
    assert shown["disks"] == [] and shown["usb_rules"] == []
    assert "owner:" in vms("vm", "show", "web1").output
    assert "no user named 'nobody'" in vms("vm", "add", "x", "--owner", "nobody", code=1).output
    assert "invalid VM name" in vms("vm", "add", "a/b", "--owner", "alice", code=1).output
    vms("vm", "remove", "web2", "--yes")
    assert [v["name"] for v in js("vm", "list")] == ["web1"]
    assert "no VM named" in vms("vm", "show", "web2", code=1).output


def test_perm_set_and_show(ready: Path) -> None:
    out = js("perm", "set", "web1", "--normal-delete", "yes")
    assert out == {"vm": "web1", "deep_erase": True, "normal_delete": True}
    vms("perm", "set", "web1", "--deep-erase", "no")
    assert js("perm", "show", "web1") == {"vm": "web1", "deep_erase": False, "normal_delete": True}
    vms("perm", "set", "web1", code=2)


def test_usb_rules_cli(ready: Path) -> None:
    vms("usb", "allow", "web1", "0781:5567", "--interface", "08:06:50")
    vms("usb", "reject", "web1", "*:*", "--class", "09")
    r = vms("usb", "block", "web1", "0781:*", "--serial", "ABC", "--position", "1")
    assert 'rule 1: block id 0781:* serial "ABC"' in r.output
    rules = js("usb", "list", "web1")
    assert [(x["position"], x["action"], x["vendor_id"], x["product_id"]) for x in rules] == [
        (1, "block", "0781", "*"),
        (2, "allow", "0781", "5567"),
        (3, "reject", "*", "*"),
    ]
    assert rules[1]["interfaces"] == ["08:06:50"] and rules[2]["device_class"] == "09"
    vms("usb", "remove", "web1", "1")
    assert [x["action"] for x in js("usb", "list", "web1")] == ["allow", "reject"]
    assert "VID:PID" in vms("usb", "allow", "web1", "0781", code=2).output
    assert "hex byte" in vms("usb", "allow", "web1", "1:2", "--interface", "zz", code=2).output
    assert "no VM named" in vms("usb", "list", "nope", code=1).output
    table = vms("usb", "list", "web1").output
    assert "08:06:50" in table and "reject" in table


def test_audit_list_filter_and_verify(ready: Path) -> None:
    vms("usb", "allow", "web1", "1234:5678")
    rows = js("audit")
    assert [r["action"] for r in rows] == ["keystore.init", "user.add", "vm.add", "usb.rule.add"]
    assert [r["action"] for r in js("audit", "--vm", "web1")] == ["vm.add", "usb.rule.add"]
    assert len(js("audit", "--limit", "2")) == 2
    out = vms("audit", "verify").output
    assert out.startswith("ok: 4 rows, head 4:")
    assert js("audit", "verify")["ok"] is True


def _tamper(db: Path, sql: str) -> None:
    with sqlite3.connect(db) as c:
        c.execute("DROP TRIGGER audit_no_update")
        c.execute("DROP TRIGGER audit_no_delete")
        c.execute(sql)


def test_audit_is_append_only(ready: Path) -> None:
    with sqlite3.connect(ready) as c, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        c.execute("DELETE FROM audit WHERE seq = 1")


@pytest.mark.parametrize(
    "sql, problem",
    [
        ("UPDATE audit SET actor = 'mallory' WHERE seq = 2", "row 2: content does not match"),
        ("DELETE FROM audit WHERE seq = 2", "rows 2..2 are missing"),
        ("DELETE FROM audit WHERE seq = 3", "recorded head"),
        ("UPDATE audit SET detail = '{}' WHERE seq = 1", "row 1: content does not match"),
    ],
)
def test_audit_verify_detects_tampering(ready: Path, sql: str, problem: str) -> None:
    _tamper(ready, sql)
    r = vms("audit", "verify", code=1)
    assert problem in r.output and "FAILED" in r.output


def test_audit_anchor_detects_rewritten_history(ready: Path) -> None:
    anchor = js("audit", "verify")["head"]
    vms("audit", "verify", "--anchor", anchor)
    # a forger rewrites row 2 and recomputes every hash after it: the chain verifies, the
    # anchor kept elsewhere does not
    from keystore.audit import row_hash

    _tamper(ready, "UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    with sqlite3.connect(ready) as c:
        rows = c.execute("SELECT seq, ts, actor, action, vm, detail FROM audit ORDER BY seq")
        prev = "0" * 64
        for seq, ts, actor, action, vm, detail in rows.fetchall():
            h = row_hash(prev, seq, ts, actor, action, vm, detail)
            c.execute("UPDATE audit SET prev_hash=?, hash=? WHERE seq=?", (prev, h, seq))
            prev = h
        c.execute("UPDATE meta SET value=? WHERE key='audit_head'", (f"3:{prev}",))
    vms("audit", "verify")
    r = vms("audit", "verify", "--anchor", anchor, code=1)
    assert "history was rewritten" in r.output


def test_wrong_password_refused_counted_audited_then_locked(ready: Path) -> None:
    for i in range(1, 6):
        r = vms("user", "passwd", "alice", input="wrong-password\nnew-password-1\n", code=77)
        assert "authentication failed for user 'alice'" in r.output
        assert js("user", "list")[0]["failed_attempts"] == i
    assert js("user", "list")[0]["locked_until"] is not None
    r = vms("user", "passwd", "alice", input=f"{PW}\nnew-password-1\n", code=77)
    assert "locked until" in r.output
    actions = [a["action"] for a in js("audit")]
    assert actions.count("auth.fail") == 5 and actions[-1] == "auth.refused"
    vms("user", "unlock", "alice")
    vms("user", "passwd", "alice", input=f"{PW}\nnew-password-1\nnew-password-1\n")
    vms("user", "passwd", "alice", input=f"{PW}\nx\n", code=77)


def test_busy_database_gives_clear_error(ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dbmod, "BUSY_TIMEOUT_MS", 200)
    holder = sqlite3.connect(ready, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        r = vms("vm", "add", "web9", "--owner", "alice", code=75)
        assert "busy" in r.output and str(ready) in r.output
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    vms("vm", "add", "web9", "--owner", "alice")


def test_no_secret_in_database_dump(ready: Path) -> None:
    vms("user", "passwd", "alice", input=f"{PW}\nnew-password-1\nnew-password-1\n")
    vms("user", "passwd", "alice", input="wrong-password-9\n", code=77)
    with sqlite3.connect(ready) as c:
        dump = "\n".join(c.iterdump())
    raw = b"".join(p.read_bytes() for p in ready.parent.glob("ks.db*"))
    for secret in (PW, "new-password-1", "wrong-password-9"):
        assert secret not in dump and secret.encode() not in raw


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    vmshield = str(Path(sys.executable).parent / "vmshield")
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", vmshield, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run as another user",
)
def test_unwritable_paths_as_unprivileged_user(tmp_path: Path, sockdir: Path) -> None:
    """As uid 65534: an unreachable, an unreadable, a read-only and an uncreatable path."""
    r = _as_nobody("vm", "list", "--db", str(tmp_path / "ks.db"))  # pytest's tmp is 0700
    assert r.returncode == 1 and "is not searchable by uid 65534" in r.stderr, r.stderr
    sockdir.chmod(0o755)  # a short /tmp directory others may enter
    db = sockdir / "ks.db"
    vms("init", "--db", str(db))
    r = _as_nobody("vm", "list", "--db", str(db))  # mode 0600, owned by root
    assert r.returncode != 0 and str(db) in r.stderr and "not readable" in r.stderr
    db.chmod(0o644)
    r = _as_nobody("vm", "add", "x", "--owner", "alice", "--db", str(db))
    assert r.returncode == 1 and str(db) in r.stderr and "not writable" in r.stderr
    new = sockdir / "sub" / "ks.db"
    r = _as_nobody("init", "--db", str(new))
    assert r.returncode == 1 and str(new) in r.stderr
    assert f"directory {sockdir} is not writable" in r.stderr
    assert "Traceback" not in r.stderr
