"""Print the runtime part of scripts/requirements.lock: what the Debian package bundles.

    python scripts/debian/runtime_lock.py scripts/requirements.lock pyproject.toml > runtime.lock

The lock (pip-compile) pins every dependency of vmshield: the runtime ones, the test extras
and the build backend. The package must carry exactly the runtime ones, at the versions and
with the hashes CI tested, so the subset is derived from the lock itself rather than resolved
again: a pin is runtime if pyproject.toml's [project] dependencies name it, or if its
"# via" lines name a runtime pin (pip-compile writes who pulled each pin in). Entries pulled
in only by the extras (pytest, mypy...) or the build system (setuptools) are left out.
The output keeps each pin's hash lines, so `pip install --require-hashes` checks them.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")
VIA_ONE = re.compile(r"^\s*# via (.+)$")
VIA_MORE = re.compile(r"^\s*#\s+(\S.*)$")
REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
SELF = "vmshield (pyproject.toml)"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(lock: str) -> dict[str, tuple[list[str], set[str]]]:
    """name -> (its requirement lines with hashes, the names of what pulled it in)."""
    entries: dict[str, tuple[list[str], set[str]]] = {}
    current: str | None = None
    in_via = False
    for line in lock.splitlines():
        pin = PIN.match(line)
        if pin:
            current = normalize(pin.group(1))
            entries[current] = ([line], set())
            in_via = False
            continue
        if current is None:
            continue
        lines, parents = entries[current]
        if line.lstrip().startswith("--hash"):
            lines.append(line)
        elif one := VIA_ONE.match(line):
            parents.add(one.group(1).strip())
            in_via = False
        elif line.strip() == "# via":
            in_via = True
        elif in_via and (more := VIA_MORE.match(line)):
            parents.add(more.group(1).strip())
        else:
            in_via = False
    return entries


def runtime_subset(lock: str, pyproject: dict[str, object]) -> dict[str, list[str]]:
    project = pyproject["project"]
    assert isinstance(project, dict)
    direct = set()
    for req in project["dependencies"]:
        m = REQ_NAME.match(req)
        if m:
            direct.add(normalize(m.group(1)))
    entries = parse(lock)
    missing = direct - entries.keys()
    if missing:
        raise SystemExit(f"runtime_lock: the lock has no pin for {', '.join(sorted(missing))}")
    keep = set(direct)
    changed = True
    while changed:
        changed = False
        for name, (_, parents) in entries.items():
            if name in keep:
                continue
            if any(normalize(p) in keep for p in parents if p != SELF):
                keep.add(name)
                changed = True
    return {name: entries[name][0] for name in sorted(keep)}


def main() -> int:
    lock, pyproject = Path(sys.argv[1]), Path(sys.argv[2])
    subset = runtime_subset(lock.read_text(), tomllib.loads(pyproject.read_text()))
    print(f"# runtime subset of {lock.name}, derived by scripts/debian/runtime_lock.py")
    for lines in subset.values():
        # the last hash line of a pin ends without a continuation backslash
        lines = [*lines[:-1], lines[-1].rstrip(" \\")]
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
