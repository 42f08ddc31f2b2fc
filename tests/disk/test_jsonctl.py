"""The shared control-socket client (nbd_plugin/osutil/jsonctl.py) against servers that
misbehave: every way ends in one ControlError line naming the socket, never a hang or a
traceback, and never an unbounded read."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_plugin.osutil import jsonctl


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


def serve_once(path: Path, answer: bytes) -> threading.Thread:
    """A server that reads one line and answers `answer` (bytes as they are), then closes."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(answer)
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_an_answer_is_the_object_sent_back(sock_path: Path) -> None:
    t = serve_once(sock_path, b'{"ok": true, "vms": []}\n')
    assert jsonctl.request(sock_path, {"op": "list"}, timeout=5) == {"ok": True, "vms": []}
    t.join(5)


@pytest.mark.parametrize(
    "answer",
    [b"", b"\n", b"not json\n", b"[1, 2]\n", b'"text"\n', b"42\n", b'{"ok": tr', b"\xff\xfe\n"],
)
def test_no_answer_or_not_an_object_is_one_line(sock_path: Path, answer: bytes) -> None:
    t = serve_once(sock_path, answer)
    with pytest.raises(jsonctl.ControlError) as e:
        jsonctl.request(sock_path, {"op": "list"}, timeout=5)
    assert str(sock_path) in str(e.value) and "\n" not in str(e.value)
    t.join(5)


@pytest.mark.parametrize("extra", [0, 1, 4096])
def test_an_oversized_answer_is_refused_not_buffered(sock_path: Path, extra: int) -> None:
    limit = 1000
    body = b'{"x": "' + b"a" * (limit + extra) + b'"}\n'
    t = serve_once(sock_path, body)
    with pytest.raises(jsonctl.ControlError, match="more than 1000 bytes"):
        jsonctl.request(sock_path, {"op": "list"}, timeout=5, limit=limit)
    t.join(5)


def test_an_answer_at_the_limit_is_taken(sock_path: Path) -> None:
    body = b'{"x": "' + b"a" * 100 + b'"}\n'
    t = serve_once(sock_path, body)
    got = jsonctl.request(sock_path, {"op": "list"}, timeout=5, limit=len(body))
    assert got == {"x": "a" * 100}
    t.join(5)


def test_nothing_listening_is_one_line(sock_path: Path) -> None:
    with pytest.raises(jsonctl.ControlError, match="cannot reach"):
        jsonctl.request(sock_path, {"op": "list"}, timeout=1)


def test_a_silent_server_times_out(sock_path: Path) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(1)
    try:
        with pytest.raises(jsonctl.ControlError, match=r"did not answer within 0\.3 s"):
            jsonctl.request(sock_path, {"op": "list"}, timeout=0.3)
    finally:
        srv.close()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() <= before + 1
