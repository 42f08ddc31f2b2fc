"""Issue 12, the keystore's findings, tried as an attacker would (each test failed before
its fix): parallel guesses against the lockout (5), telling unknown users apart by timing
(6), and a forged audit actor (17)."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.backends import open_repository
from keystore.location import Location
from keystore.sqlite import connection as dbmod
from keystore.sqlite.repository import SqliteRepository
from tests.support import ROOT

#: slow enough (tens of ms) that 24 guesses really overlap in the verification
RACE_POLICY = "PasswordHasher(time_cost=2, memory_cost=16384, parallelism=1)"

GUESSER = f"""
import asyncio, os, sys, time
from argon2 import PasswordHasher
from keystore.auth import AuthPolicy
from keystore.backends import open_repository
from keystore.location import Location

where, go = sys.argv[1], sys.argv[2]

async def main():
    repo = await open_repository(Location.parse(where), policy=AuthPolicy(hasher={RACE_POLICY}))
    while not os.path.exists(go):
        time.sleep(0.002)
    try:
        await repo.authenticate("alice", b"wrong-guess", actor="attacker")
    except Exception as e:
        print(type(e).__name__)
    finally:
        await repo.close()

asyncio.run(main())
"""


def _make_keystore(where: Location | Path, policy: AuthPolicy) -> None:
    if isinstance(where, Path):
        dbmod.initialise(where)

    async def setup() -> None:
        async with await open_repository(where, policy=policy) as r:
            await r.add_principal("alice", b"the-right-password", actor="t")

    asyncio.run(setup())


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def keystore_at(request: pytest.FixtureRequest, tmp_path: Path) -> Location | Path:
    """An empty keystore of each backend."""
    if request.param == "sqlite":
        return tmp_path / "ks.db"
    cluster = request.getfixturevalue("pg_cluster")
    return Location.parse(cluster.keystore())


def test_parallel_wrong_passwords_cannot_bypass_the_lockout(
    tmp_path: Path, keystore_at: Location | Path
) -> None:
    db = keystore_at
    policy = AuthPolicy(hasher=PasswordHasher(time_cost=2, memory_cost=16384, parallelism=1))
    _make_keystore(db, policy)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GUESSER, str(db), str(go)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(24)
    ]
    time.sleep(3)  # every guesser has opened the keystore and waits
    go.touch()
    outcomes = [p.communicate(timeout=120)[0].strip() for p in procs]
    verified = outcomes.count("AuthenticationFailed")
    assert verified == policy.max_failures, outcomes
    assert outcomes.count("AccountLocked") == 24 - policy.max_failures, outcomes

    async def audit_and_state() -> tuple[list[str], int]:
        async with await open_repository(db, policy=policy) as r:
            rows = await r.list_audit()
            return [e.action for e in rows], (await r.get_principal("alice")).failed_attempts

    actions, failures = asyncio.run(audit_and_state())
    assert actions.count("auth.fail") == policy.max_failures
    assert actions.count("auth.refused") == 24 - policy.max_failures
    assert failures == policy.max_failures


def _cli(db: Path, user: str, password_file: Path) -> float:
    """CPU seconds (user + system, all threads, as the kernel accounts them to the child:
    an outside clock that load on the machine does not stretch) that a fresh
    `vmshield user passwd USER` spends before it refuses."""
    env = {**os.environ, "VMSHIELD_DB": str(db)}
    env.pop("SUDO_USER", None)
    p = subprocess.Popen(
        [sys.executable, "-c", "from keystore.cli import main; main()", "user", "passwd", user,
         "--password-file", str(password_file)],
        env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.stderr is not None
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.returncode == 77 and "authentication failed" in err, err
    return usage.ru_utime + usage.ru_stime


def _unlock(db: Path) -> None:
    async def go() -> None:
        async with await SqliteRepository.open(db) as r:
            await r.unlock_principal("alice", actor="test")

    asyncio.run(go())


@pytest.mark.slow
def test_an_unknown_user_takes_as_long_as_a_wrong_password(tmp_path: Path) -> None:
    db = tmp_path / "ks.db"
    _make_keystore(db, AuthPolicy())  # the real parameters (RFC 9106, 64 MiB)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not-the-password")
    policy = AuthPolicy()
    verifier = policy.hash(b"x")
    t0 = time.process_time()
    policy.verify(verifier, b"y")
    one_verify = time.process_time() - t0
    known, unknown = [], []
    for _ in range(5):  # interleaved
        known.append(_cli(db, "alice", wrong))
        unknown.append(_cli(db, "mallory", wrong))
        _unlock(db)
    k, u = statistics.median(known), statistics.median(unknown)
    assert abs(u - k) < 0.5 * one_verify, (one_verify, known, unknown)
    assert abs(u - k) / k < 0.25, (known, unknown)


def test_the_dummy_verifier_is_a_constant_with_the_hashers_parameters() -> None:
    from keystore.auth import dummy_verifier

    hasher = PasswordHasher(time_cost=2, memory_cost=1024, parallelism=2)
    v = dummy_verifier(hasher)
    assert v == dummy_verifier(PasswordHasher(time_cost=2, memory_cost=1024, parallelism=2))
    assert v.startswith("$argon2id$v=19$m=1024,t=2,p=2$")
    assert not hasher.check_needs_rehash(v)
    t0 = time.process_time()
    dummy_verifier(PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4))
    assert time.process_time() - t0 < 0.01  # built, not computed


@pytest.fixture
def ks(tmp_path: Path) -> Path:
    db = tmp_path / "ks.db"
    _make_keystore(db, AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8)))
    return db


def test_every_audit_row_records_the_real_uid_whatever_sudo_user_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pwd

    from click.testing import CliRunner

    from keystore.cli import main
    from keystore.sqlite import audit

    db = tmp_path / "ks.db"
    monkeypatch.setenv("VMSHIELD_DB", str(db))
    monkeypatch.setenv("SUDO_USER", "the-boss")
    runner = CliRunner()
    assert runner.invoke(main, ["init"]).exit_code == 0
    audit.append_audit(db, "usbgate", "usb.attach", None, {"port": 1})  # another component
    rows = audit.verify(db)
    assert rows.ok
    me = {"os_uid": os.getuid(), "os_user": pwd.getpwuid(os.getuid()).pw_name}

    async def entries() -> list[audit.AuditEntry]:
        async with await SqliteRepository.open(db) as r:
            return await r.list_audit()

    listed = asyncio.run(entries())
    assert len(listed) == 2
    for e in listed:
        assert {"os_uid": e.os_uid, "os_user": e.os_user} == me, e
        assert "os_uid" in e.to_json() and "os_uid" not in e.detail
    # a caller cannot put another uid in the row either
    audit.append_audit(db, "x", "test.forge", None, {"os_uid": 4242})
    assert asyncio.run(entries())[-1].os_uid == os.getuid()


RUNUSER = "vmshield-t2"


@pytest.fixture(scope="module")
def other_user() -> str:
    """A second local user (created for the test; the machine's root runs the suite)."""
    import pwd

    if os.geteuid() != 0:
        pytest.skip("needs root to create a second local user")
    try:
        pwd.getpwnam(RUNUSER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", RUNUSER], check=True)
    return RUNUSER


def test_sudo_user_is_not_the_actor_of_an_unprivileged_caller(
    tmp_path: Path, other_user: str
) -> None:
    tmp_path.chmod(0o755)
    code = (
        "import os; os.environ['SUDO_USER'] = 'root'; "
        "from keystore.audit import cli_actor; print(cli_actor())"
    )
    r = subprocess.run(
        ["runuser", "-u", other_user, "--", sys.executable, "-c", code],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert r.stdout.strip() == f"{other_user}@cli"
