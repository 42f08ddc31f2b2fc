"""A software TPM 2.0 for tests: swtpm on loopback, reached by tpm2-tools (clevis' tpm2 pin)
through the TCTI in TPM2TOOLS_TCTI (on a real host: the default /dev/tpmrm0)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.tang import _free_port


def _port_pair() -> tuple[int, int]:
    """Two free loopback ports N, N + 1: the swtpm TCTI finds the control channel at N + 1."""
    for _ in range(50):
        port = _free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port, port + 1
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


@contextlib.contextmanager
def swtpm(state: Path) -> Iterator[str]:
    """Run swtpm with its state in `state`; yields the TPM2TOOLS_TCTI value that reaches it."""
    state.mkdir(parents=True, exist_ok=True)
    port, ctrl = _port_pair()
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
         "--flags", "not-need-init,startup-clear"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("swtpm did not listen")
            time.sleep(0.02)
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        proc.terminate()
        proc.wait(10)
