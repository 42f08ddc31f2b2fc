"""A throwaway PostgreSQL cluster (tests, benchmark): initdb + pg_ctl in a temp dir, socket only.

One cluster per test session (tests/conftest.py `pg_cluster`) or benchmark run. initdb and postgres
refuse to run as root, so as root the server runs as an unprivileged system user
(`vmshield-pgtest`, created if missing) through `runuser`; otherwise as the current user.
No TCP: `listen_addresses = ''`, the socket lives in the temp dir, local connections are
trusted (the temp dir is the only door). Each test that needs a keystore gets a fresh
database cloned from a migrated template (`CREATE DATABASE ... TEMPLATE`: ~20 ms).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from keystore.postgres import connection as pgconn

PG_USER = "vmshield-pgtest"
SUPERUSER = "postgres"
TEMPLATE = "vmshield_template"


def pg_bindir() -> Path:
    """Debian keeps the server binaries under /usr/lib/postgresql/VERSION/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: p.parts[-3])
    if not found:
        raise RuntimeError("PostgreSQL server not installed: run scripts/setup (postgresql)")
    return found[-1].parent


def _ensure_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as when we are root (None otherwise)."""
    if os.geteuid() != 0:
        return None
    for _ in range(20):  # another session may be creating it at the same moment
        try:
            return pwd.getpwnam(PG_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 PG_USER],
                check=False, capture_output=True,
            )  # fmt: skip
            time.sleep(0.1)
    return pwd.getpwnam(PG_USER)


class Cluster:
    """initdb'd data directory + running postmaster; `url(db, user)` connects to it."""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        self.user = _ensure_user()
        self.dir = Path(tempfile.mkdtemp(prefix="vmspg", dir="/tmp"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._names = itertools.count(1)
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        os.chmod(self.dir, 0o755)  # the socket must be reachable by the test process

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if self.user is not None:
            cmd = ["runuser", "-u", self.user.pw_name, "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=self.dir)

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions",
        )  # fmt: skip
        opts = (
            f"-c listen_addresses='' -c unix_socket_directories={self.dir} -c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-o", opts, "-w", "-t", "60", "start",
        )  # fmt: skip
        pgconn.initialise(self.url(self.create_database(TEMPLATE, template="template1")))

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, db: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@/{db}?host={self.dir}"

    def admin(self, db: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.url(db), autocommit=True)

    def create_database(self, name: str | None = None, *, template: str = TEMPLATE) -> str:
        """A new database (by default a copy of the migrated, empty keystore)."""
        name = name or f"ks{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'.encode())
        return name

    def keystore(self, user: str = SUPERUSER) -> str:
        """The URL of a fresh, empty, migrated keystore database (its database privileges,
        which a template does not pass on, applied by `initialise`)."""
        name = self.create_database()
        pgconn.initialise(self.url(name))
        return self.url(name, user)

    def terminate(self, db: str, application_name: str | None = None) -> int:
        """pg_terminate_backend every other session on `db` (optionally one application's)."""
        sql = (
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()"
        )
        params: tuple[str, ...] = (db,)
        if application_name is not None:
            sql += " AND application_name = %s"
            params += (application_name,)
        with self.admin() as conn:
            row = conn.execute(sql.encode(), params).fetchone()
        return int(row[0]) if row else 0


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
