"""Issue 22: the host server's exports (nbd_plugin/serve/exports.py) driven without nbdkit.

Real LUKS images and real locks; the peer is what /proc says about a pid (serve/peers.py),
built directly here. The same paths through real nbdkit are in test_host_server.py.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.serve.control import Add, Bind, Code, Events, Failure, Ok, Ping, Remove
from nbd_plugin.serve.exports import ExportRefused, Exports
from nbd_plugin.serve.peers import Peer

VM = "5d1c4a52-8a43-4f0e-9a53-1c0ffee0000a"
QEMU = Peer(4242, "qemu-system-x86_64", VM, None)
OTHER = Peer(4343, "nbdinfo", None, None)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(3):
        path = tmp_path / f"d{i}.img"
        luks.create_image(str(path), 1 << 20, b"pw", iterations=1000)
        out.append(path)
    return out


def add(ex: Exports, name: str, image: Path, **kw: object) -> Ok | Failure:
    return ex.handle(Add(name, str(image), bytearray(b"pw"), **kw))  # type: ignore[arg-type]


def test_concurrent_adds_of_one_name_serve_it_once(images: list[Path]) -> None:
    lines: list[str] = []
    ex = Exports(log=lines.append)
    results: list[Ok | Failure] = []
    threads = [
        threading.Thread(target=lambda p=p: results.append(add(ex, "web", p))) for p in images
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(r).__name__ for r in results) == ["Failure", "Failure", "Ok"]
    assert all(r.code == Code.EXISTS for r in results if isinstance(r, Failure))
    assert ex.names() == ["web"]
    ex.close_all()


def test_the_passphrase_is_wiped_after_an_add_whatever_its_outcome(images: list[Path]) -> None:
    ex = Exports(log=lambda line: None)
    good = Add("a", str(images[0]), bytearray(b"pw"))
    bad = Add("b", str(images[1]), bytearray(b"nope"))
    assert isinstance(ex.handle(good), Ok)
    resp = ex.handle(bad)
    assert isinstance(resp, Failure) and resp.code == Code.BAD_PASSPHRASE
    assert good.passphrase == bytearray(2) and bad.passphrase == bytearray(4)
    ex.close_all()


def test_binding_refusal_unknown_names_and_the_event_log(images: list[Path]) -> None:
    lines: list[str] = []
    ex = Exports(log=lines.append, clock=lambda: 1000.0)
    add(ex, "web", images[0], bind=Bind(VM, None))
    add(ex, "db", images[1])
    with pytest.raises(ExportRefused, match="pid 4343 \\(nbdinfo\\) carries no -uuid"):
        ex.open("web", OTHER)
    with pytest.raises(ExportRefused, match="no such export"):
        ex.open("x\n\x00y", OTHER)
    assert ex.names(OTHER) == ["db"] and ex.names(QEMU) == ["db", "web"]
    conn = ex.open("web", QEMU)
    assert conn.pid == 4242
    events, last = ex.events(0)
    assert last == 2 and [e.export for e in events] == ["web", "'x\\n\\x00y'"]
    assert ex.events(1) == ([events[1]], 2)
    assert not any("\x00" in line or "y\n" in line for line in lines)
    ex.close(conn)
    ex.close_all()


def test_remove_busy_force_and_the_image_closed_after_its_last_client(
    images: list[Path],
) -> None:
    ex = Exports(log=lambda line: None)
    add(ex, "web", images[0])
    conn = ex.open("web", QEMU)
    buf = bytearray(4096)
    conn.pwrite(b"\x07" * 4096, 0)
    conn.pread(buf, 0)
    info = ex.snapshot()[0].info()
    assert (info.bytes_read, info.bytes_written, info.clients) == (4096, 4096, (4242,))
    busy = ex.handle(Remove("web"))
    assert isinstance(busy, Failure) and busy.code == Code.BUSY and "pid 4242" in busy.error
    fd = conn.volume.fd
    assert isinstance(ex.handle(Remove("web", force=True)), Ok)
    with pytest.raises(OSError) as info_:
        conn.pread(buf, 0)
    assert info_.value.errno == errno.EIO
    os.fstat(fd)  # still open under the connection
    again = add(ex, "web", images[0])
    assert isinstance(again, Failure) and again.code == Code.BUSY
    ex.close(conn)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the last connection
    assert isinstance(add(ex, "web", images[0]), Ok)
    nf = ex.handle(Remove("nope"))
    assert isinstance(nf, Failure) and nf.code == Code.NOT_FOUND
    ping = ex.handle(Ping())
    assert isinstance(ping, Ok) and ping.body["pid"] == os.getpid()
    evs = ex.handle(Events(0))
    assert isinstance(evs, Ok) and evs.body == {"events": [], "last": 0}
    ex.close_all()


def test_readonly_server_serves_every_export_read_only(images: list[Path]) -> None:
    ex = Exports(readonly=True, log=lambda line: None)
    ok = add(ex, "web", images[0])
    assert isinstance(ok, Ok) and ok.body["export"]["readonly"] is True
    conn = ex.open("web", QEMU)
    assert conn.volume.readonly
    # read-only exports take a shared lock: a second read-only add of the image works
    assert isinstance(add(ex, "web-ro", images[0], readonly=True), Ok)
    ex.close(conn)
    ex.close_all()
