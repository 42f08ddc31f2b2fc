"""Test helpers for libvirt: the keystore a hook test needs, and finding leftover processes.

The private libvirtd itself is scripts/lab/libvirtd.py (the demo uses it too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scripts.lab.libvirtd import Libvirtd, available, domain_xml

__all__ = ["Keystore", "Libvirtd", "available", "domain_xml", "processes"]


def processes(needle: str) -> list[int]:
    """Pids whose command line contains `needle` (to check nothing is left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle.encode() in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


@dataclass
class Keystore:
    """A keystore with user alice, VM `vm` and its disk `vm`-0, plus the hook's config."""

    base: Path
    vm: str = "web1"
    password: bytes = b"correct horse battery staple"

    @property
    def db(self) -> Path:
        return self.base / "keystore.db"

    @property
    def config(self) -> Path:
        return self.base / "hook.conf"

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def host_key(self) -> Path:
        return self.base / "host.key"

    @property
    def pwfile(self) -> Path:
        return self.base / "alice.pw"

    @property
    def disk(self) -> str:
        return f"{self.vm}-0"

    def env(self) -> dict[str, str]:
        return {**os.environ, "VMSHIELD_DB": str(self.db), "VMSHIELD_HOOK_CONF": str(self.config)}

    def cli(self, *args: str, code: int | None = 0) -> subprocess.CompletedProcess[str]:
        """`vmshield ARGS` in process (CliRunner: no interpreter start per call)."""
        from click.testing import CliRunner

        from keystore.cli import main

        env = {"VMSHIELD_DB": str(self.db), "VMSHIELD_HOOK_CONF": str(self.config)}
        r = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
        p = subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)
        if code is not None and p.returncode != code:
            raise AssertionError(
                f"vmshield {' '.join(args)} exited {p.returncode}, not {code}: {p.stderr}"
            )
        return p

    def create(self, *, disks: int = 1) -> str:
        """The keystore, user, VM (returns its uuid) and `disks` 64 MiB LUKS2 disks."""
        from scripts.lab.guest import write_secret

        write_secret(self.pwfile, self.password)
        pw = str(self.pwfile)
        self.cli("init")
        self.cli("user", "add", "alice", "--password-file", pw)
        out = self.cli("vm", "add", self.vm, "--owner", "alice").stdout
        for _ in range(disks):
            self.cli("disk", "create", self.vm, "--size", "64M", "--pbkdf-iterations", "1000",
                     "--password-file", pw)  # fmt: skip
        return out.split("uuid ")[1].rstrip(")\n")

    def install_hook(self, hooks_dir: Path) -> None:
        self.cli("libvirt", "install-hook", "--hooks-dir", str(hooks_dir), "--config",
                 str(self.config), "--run-dir", str(self.run_dir), "--host-key",
                 str(self.host_key))  # fmt: skip

    def audit(self, limit: int = 20) -> list[dict[str, object]]:
        import json

        rows: list[dict[str, object]] = json.loads(
            self.cli("audit", "--json", "--limit", str(limit)).stdout
        )
        return rows


@contextlib.contextmanager
def hook_keystore(prefix: str) -> Iterator[Keystore]:
    """A `Keystore` under a new /tmp directory with the hook installed (no libvirtd); on exit
    its unlock is withdrawn, what it started is stopped and the directory removed."""
    from keystore.services import unlock

    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    k = Keystore(base)
    uuid = k.create()
    k.install_hook(base / "hooks")
    try:
        yield k
    finally:
        unlock.consume(uuid)
        for pid in processes(str(base)):
            os.kill(pid, 15)
        shutil.rmtree(base, ignore_errors=True)
