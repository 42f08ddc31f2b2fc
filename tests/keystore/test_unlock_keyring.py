"""The unlock in root's kernel keyring (issue 20 B9, and C: consume of an older unlock).

B9: the key was 0x3f3f0000, readable by any uid-0 process in any session keyring (a
container without a user namespace, a service with a private keyring). Now only its
possessor reads it. C: the hook invalidated whatever unlock carried the VM's name, so an
unlock given again while a start was under way was removed by that start."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from keystore.services import unlock
from tests.support import ROOT

pytestmark = pytest.mark.skipif(shutil.which("keyctl") is None, reason="keyutils missing")


@pytest.fixture
def vm_uuid() -> Iterator[str]:
    u = str(uuid.uuid4())
    try:
        yield u
    finally:
        while unlock.consume(u):
            pass


def in_fresh_session(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """ARGV as root in a session keyring of its own (as another service or a container)."""
    return subprocess.run(["keyctl", "session", "-", *argv], capture_output=True, timeout=30,
                          cwd=ROOT)  # fmt: skip


def test_root_in_another_session_cannot_read_an_unlock(vm_uuid: str) -> None:
    unlock.put(vm_uuid, b"owner password 1", 60)
    key = unlock._search(vm_uuid)
    assert key is not None
    for verb in ("pipe", "print", "read"):
        r = in_fresh_session("keyctl", verb, key)
        assert r.returncode != 0 and b"owner password 1" not in r.stdout, (verb, r)
        assert b"Permission denied" in r.stderr
    # the hook, in libvirtd's private session keyring, still reads it
    code = f"from keystore.services import unlock; print(bytes(unlock.peek({vm_uuid!r})))"
    r = in_fresh_session(sys.executable, "-c", code)
    assert r.returncode == 0 and r.stdout.strip() == b"b'owner password 1'", r


def test_consuming_the_unlock_read_leaves_a_newer_one(vm_uuid: str) -> None:
    unlock.put(vm_uuid, b"owner password 1", 60)
    read = unlock.peek_key(vm_uuid)
    assert read is not None and read[1] == b"owner password 1"
    unlock.put(vm_uuid, b"owner password 2", 60)  # the owner unlocks again meanwhile
    unlock.consume_key(read[0])  # the start that read the first one ends
    assert unlock.peek(vm_uuid) == b"owner password 2"
