"""`vmshield` loads only what a command needs (issue 26 item 15): `--version` and the live USB
rule commands never import the disk data path (numpy, numba, the LUKS library) or psycopg.

Each check runs the real command in a fresh interpreter and looks at its `sys.modules`; the
start-up time itself is measured from outside by `scripts/bench cli`, not by a timed test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from keystore.cli import main
from keystore.sqlite import repository as sqlite_repo
from tests.support.cli import FAST

#: what a command that touches no disk must not load
HEAVY = ("numba", "numpy", "psycopg", "nbd_plugin.luks", "nbd_plugin.crypto", "nbd_plugin.erase")
#: what a USB rule command must not load either: it runs without an event loop on SQLite's
#: blocking connection and checks no password
LOOP = ("asyncio", "aiosqlite", "argon2", "_argon2_cffi_bindings")

_PROBE = """
import json, sys
from keystore.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _loaded(args: list[str], db: Path) -> dict[str, Any]:
    env = {**os.environ, "VMSHIELD_DB": str(db)}
    p = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def _heavy(modules: list[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    return [m for m in modules if m.split(".")[0] in heavy or m.startswith(heavy)]


def test_version_loads_no_command_module(tmp_path: Path) -> None:
    got = _loaded(["--version"], tmp_path / "ks.db")
    assert got["code"] == 0
    assert _heavy(got["modules"]) == []
    assert not [m for m in got["modules"] if m.startswith("keystore.") and m != "keystore.cli"]


def test_usb_block_loads_no_disk_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    db = tmp_path / "ks.db"
    for args, stdin in (
        (["init"], None),
        (["user", "add", "alice"], "startup-pass-1\n"),
        (["vm", "add", "web", "--owner", "alice"], None),
    ):
        r = CliRunner().invoke(main, args, input=stdin, env={"VMSHIELD_DB": str(db)})
        assert r.exit_code == 0, r.output
    got = _loaded(["usb", "block", "web", "0781:5567"], db)
    assert got["code"] == 0
    assert "keystore.sqlite.repository" in got["modules"]  # it did commit the rule
    assert _heavy(got["modules"]) == []
    listed = _loaded(["usb", "list", "web", "--json"], db)
    assert listed["code"] == 0 and _heavy(listed["modules"]) == []


def test_usb_rule_commands_run_without_an_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 26 item 15: the rule commands import neither asyncio nor aiosqlite nor argon2
    (about 20 ms of a 90 ms start), and still commit through the one repository."""
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    db = tmp_path / "ks.db"
    for args, stdin in (
        (["init"], None),
        (["user", "add", "alice"], "startup-pass-1\n"),
        (["vm", "add", "web", "--owner", "alice"], None),
    ):
        r = CliRunner().invoke(main, args, input=stdin, env={"VMSHIELD_DB": str(db)})
        assert r.exit_code == 0, r.output
    for args in (
        ["usb", "block", "web", "0781:5567"],
        ["usb", "allow", "web", "0781:*", "--interface", "08:06:50"],
        ["usb", "list", "web", "--json"],
        ["usb", "remove", "web", "2"],
        ["usb", "qemu-filter", "web"],
    ):
        got = _loaded(args, db)
        assert got["code"] == 0, args
        assert _heavy(got["modules"], LOOP) == [], args
    listed = CliRunner().invoke(
        main, ["usb", "list", "web", "--json"], env={"VMSHIELD_DB": str(db)}
    )
    kept = [(r["action"], r["vendor_id"], r["product_id"]) for r in json.loads(listed.output)]
    assert kept == [("block", "0781", "5567")]  # the allow rule went in at 2, and out again
    audit = CliRunner().invoke(main, ["audit", "--json"], env={"VMSHIELD_DB": str(db)})
    actions = [e["action"] for e in json.loads(audit.output)]
    assert actions[-3:] == ["usb.rule.add", "usb.rule.add", "usb.rule.remove"]


def test_a_disk_command_still_finds_its_modules(tmp_path: Path) -> None:
    """The lazy tree is not a way to lose a command: `image info` loads the LUKS library."""
    got = _loaded(["image", "info", "--help"], tmp_path / "ks.db")
    assert got["code"] == 0 and "nbd_plugin.luks" in got["modules"]
