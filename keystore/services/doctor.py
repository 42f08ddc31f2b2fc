"""`vmshield doctor`: is this host ready to run vmshield? One result per check, with the fix.

The convention is libvirt's `virt-host-validate`: each check says PASS, WARN (works, but
weaker or slower than it should be) or FAIL (something vmshield needs is missing or unsafe),
and a line that is not PASS says what to do. SKIP marks a check that does not apply here
(PostgreSQL when the keystore is SQLite). The exit status is the worst result: 0 all passed,
1 a warning, 2 a failure.

Each check is a function returning `Check`s; nothing here prints. The host-side checks
(directories, swap, /dev/kvm, keyutils, the libvirt hook) live in `doctor_host`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import platform
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from keystore.location import Location
from keystore.sqlite import audit
from keystore.sqlite.schema import SCHEMA_VERSION
from nbd_plugin.crypto import jit
from nbd_plugin.crypto.registry import make_cipher


class Status(enum.IntEnum):
    """A check's result; the value is its weight in the exit status."""

    SKIP = -1  #: does not apply on this host
    PASS = 0  #: ready
    WARN = 1  #: works, but weaker or slower than it should
    FAIL = 2  #: missing or unsafe: fix it before serving disks


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, the result, what was found, the fix."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "status": self.status.name,
            "detail": self.detail,
            "fix": self.fix,
        }


def exit_status(checks: Iterable[Check]) -> int:
    """The worst result's weight: 0 all passed (or skipped), 1 a warning, 2 a failure."""
    return max((int(c.status) for c in checks), default=0)


def _run(argv: list[str], timeout: float = 60.0) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]}: no answer in {timeout:.0f} s"
    return done.returncode, done.stdout + done.stderr


def _dump(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# -- nbdkit and the data path ---------------------------------------------------------------

NBDKIT_FIX = "apt install nbdkit nbdkit-plugin-python"


def check_nbdkit(plugin: Path) -> list[Check]:
    """nbdkit, its Python plugin and the Python it embeds, and vmshield's plugin loading in it."""
    rc, out = _run(["nbdkit", "--version"])
    if rc != 0:
        return [Check("nbdkit", Status.FAIL, out.strip() or f"exit status {rc}", NBDKIT_FIX)]
    nbdkit_version = out.split()[-1] if out.split() else "?"
    rc, out = _run(["nbdkit", "python", "--dump-plugin"])
    embedded = _dump(out).get("python_version")
    if rc != 0 or embedded is None:
        return [
            Check(
                "nbdkit", Status.FAIL, f"nbdkit {nbdkit_version} has no python plugin", NBDKIT_FIX
            )
        ]
    ours = platform.python_version()
    found = f"nbdkit {nbdkit_version}, python plugin embeds Python {embedded}"
    if embedded.split(".")[:2] != ours.split(".")[:2]:
        return [
            Check(
                "nbdkit",
                Status.FAIL,
                f"{found}, but vmshield runs on Python {ours}",
                "install vmshield for the Python nbdkit embeds (Debian's python3)",
            )
        ]
    checks = [Check("nbdkit", Status.PASS, f"{found} (vmshield's too)")]
    rc, out = _run(["nbdkit", "python", str(plugin), "--dump-plugin"])
    if rc != 0:
        last = (out.strip().splitlines() or [f"exit status {rc}"])[-1]
        checks.append(
            Check(
                "plugin",
                Status.FAIL,
                f"{plugin} does not load: {last}",
                "reinstall vmshield (apt install --reinstall vmshield)",
            )
        )
    else:
        checks.append(Check("plugin", Status.PASS, f"{plugin} loads in nbdkit"))
    return checks


def measure_xts(seconds: float = 1.0, size: int = 1 << 20) -> tuple[str, float]:
    """(data path, MB/s) of AES-256-XTS encryption of `size`-byte requests for ~`seconds`."""
    path = jit.data_path()
    cipher = make_cipher("aes", "xts-plain64", os.urandom(64), 4096, 8)
    src, dst = bytearray(os.urandom(size)), bytearray(size)
    cipher.encrypt(src, dst, 0)  # the first call may still set things up
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        cipher.encrypt(src, dst, done // 4096)
        done += size
    return path, done / elapsed / 1e6


def check_data_path(seconds: float = 1.0) -> list[Check]:
    path, speed = measure_xts(seconds)
    found = f"{path}, AES-256-XTS {speed:,.0f} MB/s on one core (1 MiB requests)"
    if path == "numba":
        return [Check("data path", Status.PASS, found)]
    return [
        Check(
            "data path",
            Status.WARN,
            f"{found}; why not numba: {jit.reason()}",
            "make numba importable for Debian's python3 (the package bundles it)",
        )
    ]


# -- the keystore ---------------------------------------------------------------------------


def _mode_problem(path: Path, st: os.stat_result, want: int) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})"
    if mode & ~want & 0o777:
        return f"{path} has mode {mode:04o} (others may read or change it)"
    return None


def _schema_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_sqlite_keystore(path: Path) -> list[Check]:
    """The keystore file and its directory (owner, mode), its schema, its audit chain."""
    where = path.parent
    if not path.exists():
        return [
            Check(
                "keystore", Status.WARN, f"{path} does not exist yet", f"vmshield init --db {path}"
            )
        ]
    problems = []
    for p, want, fix in ((where, 0o700, f"chmod 700 {where}"), (path, 0o600, f"chmod 600 {path}")):
        bad = _mode_problem(p, os.stat(p), want)
        if bad:
            problems.append((bad, fix if "mode" in bad else f"chown {os.geteuid()} {p}"))
    if problems:
        return [
            Check(
                "keystore",
                Status.FAIL,
                "; ".join(p for p, _ in problems),
                "; ".join(f for _, f in problems),
            )
        ]
    try:
        version = _schema_version(path)
    except sqlite3.Error as e:
        return [
            Check(
                "keystore", Status.FAIL, f"{path} cannot be read: {e}", "restore it from a backup"
            )
        ]
    found = f"{path} (yours, mode 0600, directory 0700), schema {version}"
    if version < SCHEMA_VERSION:
        return [
            Check(
                "keystore",
                Status.WARN,
                f"{found}, this vmshield uses {SCHEMA_VERSION}",
                f"vmshield init --db {path}",
            )
        ]
    if version > SCHEMA_VERSION:
        return [
            Check(
                "keystore",
                Status.FAIL,
                f"{found}, newer than this vmshield's {SCHEMA_VERSION}",
                "upgrade vmshield",
            )
        ]
    checks = [Check("keystore", Status.PASS, found)]
    result = audit.verify(path)
    head = f"{result.head_seq}:{result.head_hash}"
    if result.ok:
        checks.append(Check("audit chain", Status.PASS, f"{result.rows} rows verify, head {head}"))
    else:
        checks.append(
            Check(
                "audit chain",
                Status.FAIL,
                "; ".join(result.problems),
                "vmshield audit verify; compare with a copied head",
            )
        )
    return checks


def check_postgres(location: Location) -> list[Check]:
    """A PostgreSQL keystore: reachable, and its schema version."""
    from keystore.postgres import connection as pgconn
    from keystore.postgres.schema import SCHEMA_VERSION as PG_VERSION

    try:
        conn = pgconn.connect_sync(str(location))
    except Exception as e:  # any failure to connect is this check's result
        return [
            Check(
                "postgresql",
                Status.FAIL,
                f"{location.display()}: {e}",
                "check the URL, ~/.pgpass and that the server runs; vmshield init",
            )
        ]
    try:
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    finally:
        conn.close()
    version = int(row[0]) if row and row[0] is not None else 0
    return [
        Check(
            "postgresql",
            Status.PASS,
            f"{location.display()} reachable, schema {version} (this vmshield: {PG_VERSION})",
        )
    ]


def check_keystore(location: Location) -> list[Check]:
    if location.file is None:
        return check_postgres(location)
    return [
        *check_sqlite_keystore(location.file),
        Check("postgresql", Status.SKIP, "not configured (the keystore is an SQLite file)"),
    ]


# -- everything ---------------------------------------------------------------------------


def guarded(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """A check that breaks reports that as its result instead of stopping the others."""
    try:
        return check()
    except Exception as e:  # the doctor reports every problem it meets, including its own
        return [
            Check(
                name,
                Status.FAIL,
                f"the check itself failed: {type(e).__name__}: {e}",
                "report this as a vmshield bug",
            )
        ]
