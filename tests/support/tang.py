"""A real Tang server for tests: Debian's tangd behind socat on 127.0.0.1, keys by tangd-keygen.

with tang_server(tmp_path / "tang") as tang:
    tang.url           # http://127.0.0.1:PORT
    tang.stop()        # the server goes away (a host off its network)
    tang.start()       # and comes back on the same port with the same keys
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

TANGD = "/usr/libexec/tangd"
KEYGEN = "/usr/libexec/tangd-keygen"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tang:
    def __init__(self, keys: Path) -> None:
        self.keys = keys
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signing_thumbprints(self) -> set[str]:
        """The advertised signing keys' thumbprints: tangd-keygen names each key file by its
        SHA-256 thumbprint (rotated keys: hidden). Only a signing key's thumbprint selects an
        advertisement (/adv/THP); the exchange key (ECMR, deriveKey) beside it does not."""
        return {
            p.stem
            for p in self.keys.glob("*.jwk")
            if not p.name.startswith(".") and "sign" in json.loads(p.read_text()).get("key_ops", [])
        }

    def rotate(self) -> list[Path]:
        """tangd-rotate-keys: new keys advertised; the old ones (returned) still decrypt."""
        before = {p for p in self.keys.glob("*.jwk") if not p.name.startswith(".")}
        subprocess.run(["/usr/libexec/tangd-rotate-keys", "-d", str(self.keys)],
                       check=True, capture_output=True)  # fmt: skip
        return [self.keys / f".{p.name}" for p in before]

    def start(self) -> None:
        listen = f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork"
        self.proc = subprocess.Popen(
            ["socat", listen, f"EXEC:{TANGD} {self.keys}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.02)
        raise RuntimeError(f"tangd behind socat did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def tang_server(keys: Path) -> Iterator[Tang]:
    keys.mkdir(parents=True, exist_ok=True)
    subprocess.run([KEYGEN, str(keys)], check=True, capture_output=True)
    tang = Tang(keys)
    tang.start()
    try:
        yield tang
    finally:
        tang.stop()
