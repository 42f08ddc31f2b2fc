"""`vmshield doctor` through the real command: checks that pass, and checks made to fail for
real (a keystore directory others can read, a stale hook, no nbdkit on PATH, an edited audit
row, an old schema), each with its fix and the exit status of the worst result."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from keystore.sqlite.schema import SCHEMA_VERSION

VMSHIELD = str(Path(sys.executable).parent / "vmshield")


def doctor(tmp: Path, *extra: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("VMSHIELD_DB", None)
    if path is not None:
        env["PATH"] = path
    argv = [
        VMSHIELD,
        "doctor",
        "--db",
        str(tmp / "ks" / "keystore.db"),
        "--seconds",
        "0.1",
        "--hooks-dir",
        str(tmp / "hooks"),
        "--config",
        str(tmp / "hook.conf"),
        *extra,
    ]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)


def checks(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    report = json.loads(done.stdout)
    assert done.returncode == report["exit_status"], done.stderr
    return {c["name"]: c for c in report["checks"]}


def vms(tmp: Path, *args: str) -> str:
    db = str(tmp / "ks" / "keystore.db")
    done = subprocess.run(
        [VMSHIELD, *args, "--db", db], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout


def test_a_ready_keystore_and_hook_pass_with_the_audit_head(tmp_path: Path) -> None:
    vms(tmp_path, "init")
    vms(
        tmp_path,
        "libvirt",
        "install-hook",
        "--hooks-dir",
        str(tmp_path / "hooks"),
        "--config",
        str(tmp_path / "hook.conf"),
    )
    found = checks(doctor(tmp_path, "--json"))
    assert found["nbdkit"]["status"] == "PASS" and "Python 3.11" in found["nbdkit"]["detail"]
    assert found["plugin"]["status"] == "PASS"
    assert found["data path"]["status"] in ("PASS", "WARN")
    assert "MB/s" in found["data path"]["detail"]
    assert found["keystore"]["status"] == "PASS"
    assert f"schema {SCHEMA_VERSION}" in found["keystore"]["detail"]
    head = json.loads(vms(tmp_path, "audit", "verify", "--json"))
    assert found["audit chain"]["status"] == "PASS"
    assert head["head"] in found["audit chain"]["detail"]
    assert "is current" in found["libvirt hook"]["detail"]
    assert found["postgresql"]["status"] == "SKIP"
    for name in ("keyutils", "swap", "/dev/kvm", "run dir", "cache dir"):
        assert found[name]["status"] in ("PASS", "WARN"), found[name]


def test_an_open_keystore_dir_a_stale_hook_and_no_nbdkit_fail_with_their_fixes(
    tmp_path: Path,
) -> None:
    vms(tmp_path, "init")
    (tmp_path / "ks").chmod(0o755)
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "vmshield").write_text("#!/usr/bin/python3 -I\n# vmshield qemu hook\n")
    done = doctor(tmp_path, path="/nonexistent")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert lines["keystore"].startswith("FAIL")
    assert "mode 0755" in lines["keystore"]
    assert f"[fix: chmod 700 {tmp_path / 'ks'}]" in lines["keystore"]
    assert lines["nbdkit"].startswith("FAIL") and "apt install nbdkit" in lines["nbdkit"]
    assert lines["keyutils"].startswith("FAIL") and "apt install keyutils" in lines["keyutils"]
    assert lines["libvirt"].startswith("WARN") and "install-hook" in lines["libvirt"]
    assert "not the hook this vmshield writes" in lines["libvirt"]


def test_an_edited_audit_row_fails_and_an_old_schema_warns(tmp_path: Path) -> None:
    vms(tmp_path, "init")
    db = tmp_path / "ks" / "keystore.db"
    conn = sqlite3.connect(db)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        conn.execute(f'DROP TRIGGER "{name}"')
    conn.execute("UPDATE audit SET actor = 'mallory@cli' WHERE seq = 1")
    conn.commit()
    found = checks(doctor(tmp_path, "--json"))
    assert found["audit chain"]["status"] == "FAIL"
    assert "row 1" in found["audit chain"]["detail"]
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    conn.commit()
    conn.close()
    done = doctor(tmp_path, "--json")
    found = checks(done)
    assert found["keystore"]["status"] == "WARN"
    assert found["keystore"]["fix"] == f"vmshield init --db {db}"
    assert done.returncode >= 1
