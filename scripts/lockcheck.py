"""Does the running venv hold exactly what scripts/requirements.lock pins?

Run by scripts/setup with the venv's Python. Every pinned distribution must be the one Python
finds first, at the pinned version, installed inside this venv (not Debian's copy from the system
site-packages the venv also sees). Exit 1 with one line per difference.

    python scripts/lockcheck.py LOCKFILE
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    found = {}
    for line in lock.read_text().splitlines():
        m = PIN.match(line)
        if m:
            found[normalize(m.group(1))] = m.group(2)
    return found


def differences(wanted: dict[str, str]) -> list[str]:
    prefix = Path(sys.prefix).resolve()
    out = []
    for name, version in sorted(wanted.items()):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            out.append(f"{name}: not installed (lock: {version})")
            continue
        where = Path(str(dist.locate_file(""))).resolve()
        if dist.version != version:
            out.append(f"{name}: {dist.version} installed, lock says {version}")
        elif prefix not in where.parents and where != prefix:
            out.append(f"{name}: found at {where}, outside this venv")
    return out


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: lockcheck.py LOCKFILE (e.g. scripts/requirements.lock)", file=sys.stderr)
        return 2
    lock = Path(sys.argv[1])
    if not lock.is_file():
        print(f"lockcheck: {lock}: no such lock file", file=sys.stderr)
        return 2
    wanted = pins(lock)
    if not wanted:
        print(f"lockcheck: no pins in {lock}", file=sys.stderr)
        return 2
    bad = differences(wanted)
    for line in bad:
        print(f"lockcheck: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
