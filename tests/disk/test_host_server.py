"""Issue 22: one host nbdkit serves every disk as an export (plugin.py control=SOCK).

Real nbdkit, real clients (libnbd, nbdinfo, qemu-io, qemu-img's own luks driver, QEMU),
real unix sockets and uids. The control protocol itself is tested sans-IO in
test_host_control.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.serve.control import (
    Add,
    Bind,
    Code,
    Events,
    ExportInfo,
    Failure,
    List,
    Ok,
    Ping,
    Remove,
    encode,
    parse_response,
)  # fmt: skip
from nbd_plugin.serve.hostclient import HostClient, HostServerError, HostUnavailable
from nbd_plugin.serve.hostserver import may_control
from tests.support.nbd import PLUGIN, nbdkit, qemu_client, qemu_img, qemu_secret

SIZE = 4 << 20
MIB = 1 << 20
VM_A = str(uuid.UUID("5d1c4a52-8a43-4f0e-9a53-1c0ffee0000a"))
VM_B = str(uuid.UUID("5d1c4a52-8a43-4f0e-9a53-1c0ffee0000b"))


class Host:
    def __init__(self, sock: str, control: str) -> None:
        self.sock = sock
        self.control = control

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def client(self) -> HostClient:
        return HostClient(self.control, timeout=60)

    def call(self, req: object, **kw: object) -> Ok:
        with self.client() as c:
            return c.call(req, **kw)  # type: ignore[arg-type]

    def request(self, req: object) -> Ok | Failure:
        with self.client() as c:
            return c.request(req)  # type: ignore[arg-type]

    def log(self) -> str:
        return Path(self.sock + ".err").read_text(errors="replace")

    def pid(self) -> int:
        return int(Path(self.sock + ".pid").read_text())


@contextmanager
def host_server(sockdir: Path, *opts: str) -> Iterator[Host]:
    control = str(sockdir / "ctl.sock")
    with nbdkit(*opts, "python", PLUGIN, f"control={control}", sockdir=sockdir) as sock:
        yield Host(sock, control)


def make_image(path: Path, secret: bytes, size: int = SIZE) -> Path:
    luks.create_image(str(path), size, secret, iterations=1000)
    return path


def add(host: Host, name: str, image: Path, secret: bytes, **kw: object) -> Ok:
    return host.call(Add(name, str(image), bytearray(secret), **kw))  # type: ignore[arg-type]


@pytest.fixture
def two(tmp_path: Path) -> dict[str, tuple[Path, bytes]]:
    return {
        n: (make_image(tmp_path / f"{n}.img", f"pw-{n}".encode()), f"pw-{n}".encode())
        for n in ("web-0", "db-0")
    }


def wait_idle(host: Host, timeout: float = 10) -> list[ExportInfo]:
    """The exports once no client is connected (nbdkit closes a connection just after its
    client exits)."""
    deadline = time.monotonic() + timeout
    while True:
        exports = host.call(List()).exports()
        if not any(e.clients for e in exports) or time.monotonic() > deadline:
            return exports
        time.sleep(0.05)


def nbd_open(host: Host, export: str) -> object:
    import nbd

    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(host.sock)
    return h


def test_two_exports_one_process_each_its_own_disk(
    two: dict[str, tuple[Path, bytes]], sockdir: Path, tmp_path: Path
) -> None:
    with host_server(sockdir) as host:
        for name, (image, secret) in two.items():
            ok = add(host, name, image, secret)
            assert ok.body["export"]["name"] == name
        r = subprocess.run(
            ["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={host.sock}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        listed = {e["export-name"]: e["export-size"] for e in json.loads(r.stdout)["exports"]}
        assert listed == {"web-0": SIZE, "db-0": SIZE}
        # qemu-io writes a different pattern into each export
        for name, pattern in (("web-0", "0x5a"), ("db-0", "0xa5")):
            w = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 1M", host.uri(name)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert w.returncode == 0 and "wrote" in w.stdout, w.stderr
        listed_info = {e.name: e for e in wait_idle(host)}
        assert listed_info["web-0"].bytes_written == MIB and listed_info["db-0"].clients == ()
        for name in two:
            assert host.call(Remove(name)).body["removed"] == name
        assert host.call(List()).exports() == []
    # after removal the images hold what was written: checked with QEMU's own luks driver
    for (name, (image, secret)), byte in zip(two.items(), (0x5A, 0xA5), strict=True):
        key = tmp_path / f"{name}.key"
        key.write_bytes(secret)
        out = tmp_path / f"{name}.raw"
        r = qemu_img(
            "convert", "--object", qemu_secret(key), "--image-opts",
            f"driver=luks,key-secret=sec0,file.filename={image}", "-O", "raw", str(out),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        data = out.read_bytes()
        assert data[:MIB] == bytes([byte]) * MIB  # (a fresh image's holes are not zeros there)


def test_add_refusals_say_why_with_a_code_and_never_the_passphrase(
    two: dict[str, tuple[Path, bytes]], sockdir: Path, tmp_path: Path
) -> None:
    (web, web_pw), (db, db_pw) = two["web-0"], two["db-0"]
    with host_server(sockdir) as host:
        add(host, "web-0", web, web_pw)
        cases = [
            (Add("web-0", str(db), bytearray(db_pw)), Code.EXISTS, "already served"),
            (Add("db-0", str(db), bytearray(b"wrong-pw-xyzzy")), Code.BAD_PASSPHRASE, str(db)),
            (Add("web-1", str(web), bytearray(web_pw)), Code.BUSY, "served as export web-0"),
            (Add("x", str(tmp_path / "none.img"), bytearray(b"pw-q")), Code.IO, "none.img"),
            (Remove("nope"), Code.NOT_FOUND, "no export nope"),
        ]
        for req, code, says in cases:
            resp = host.request(req)
            assert isinstance(resp, Failure), req
            assert resp.code == code and says in resp.error, resp
            assert "\n" not in resp.error and "xyzzy" not in resp.error
        with host.client() as c, pytest.raises(HostServerError) as info:
            c.call(Add("db-0", str(db), bytearray(b"wrong-pw-xyzzy")))
        assert info.value.code == Code.BAD_PASSPHRASE
        # a bad line gets one invalid response, then the connection closes
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(host.control)
            s.sendall(b'{"op":"add","passphrase_b64":"eHl6enk="}\n{"op":"ping"}\n')
            s.sendall(b"x" * 70000)
            got = b""
            with contextlib.suppress(ConnectionResetError):  # closed with the x's unread
                while chunk := s.recv(65536):
                    got += chunk
        lines = [json.loads(x) for x in got.splitlines()]
        assert [x.get("code") for x in lines] == ["invalid", None, "invalid"], lines
        assert lines[1]["pid"] == host.pid()
        log = host.log()
        assert "xyzzy" not in log and "eHl6enk" not in log
        assert "Traceback" not in log


def test_unknown_export_and_another_vms_qemu_are_refused_and_reported(
    two: dict[str, tuple[Path, bytes]], sockdir: Path
) -> None:
    (web, web_pw), (db, db_pw) = two["web-0"], two["db-0"]
    with host_server(sockdir) as host:
        add(host, "web-0", web, web_pw, bind=Bind(VM_A, None))
        add(host, "db-0", db, db_pw)  # unbound: any client, as a per-disk server without bind=
        r = subprocess.Popen(
            ["nbdinfo", "--size", host.uri("web-0")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, _ = r.communicate(timeout=30)
        assert r.returncode != 0 and str(SIZE) not in out
        # listing shows nbdinfo the unbound export only, not another VM's disk
        listing = subprocess.run(
            ["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={host.sock}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert [e["export-name"] for e in json.loads(listing.stdout)["exports"]] == ["db-0"]
        r2 = subprocess.run(["nbdinfo", "--size", host.uri("nope")], capture_output=True)
        assert r2.returncode != 0
        ok = subprocess.run(["nbdinfo", "--size", host.uri("db-0")], capture_output=True, text=True)
        assert ok.stdout.strip() == str(SIZE)
        with qemu_client(host.sock, VM_B, export="web-0") as other:
            assert other.wait(timeout=60) != 0
        with qemu_client(host.sock, VM_A, export="web-0") as own:
            deadline = time.monotonic() + 30
            while not host.call(List()).exports()[1].clients and time.monotonic() < deadline:
                time.sleep(0.05)
            web_info = {e.name: e for e in host.call(List()).exports()}["web-0"]
            assert web_info.clients == (own.pid,)
            assert own.poll() is None
            busy = host.request(Remove("web-0"))
            assert isinstance(busy, Failure) and busy.code == Code.BUSY
            assert f"pid {own.pid}" in busy.error
        events = host.call(Events(0)).events()
        assert [e.kind for e in events] == ["refused"] * 3
        by_pid = {e.pid: e for e in events if e.export == "web-0"}
        assert set(by_pid) == {r.pid, other.pid}
        assert "(nbdinfo) carries no -uuid" in by_pid[r.pid].reason
        assert f"carries -uuid {VM_B}, not VM {VM_A}'s QEMU" in by_pid[other.pid].reason
        (unknown,) = [e for e in events if e.export == "nope"]
        assert "(nbdinfo) asked for nope: no such export" in unknown.reason
        assert host.call(Events(events[-1].seq)).events() == []
        assert "export web-0: refused a client: pid" in host.log()


def test_remove_while_connected_is_refused_force_fails_the_client_with_eio(
    two: dict[str, tuple[Path, bytes]], sockdir: Path
) -> None:
    import nbd

    (web, web_pw), (db, db_pw) = two["web-0"], two["db-0"]
    with host_server(sockdir) as host:
        add(host, "web-0", web, web_pw)
        add(host, "db-0", db, db_pw)
        h = nbd_open(host, "web-0")
        other = nbd_open(host, "db-0")
        try:
            h.pwrite(b"\x11" * 4096, 0)  # type: ignore[attr-defined]
            resp = host.request(Remove("web-0"))
            assert isinstance(resp, Failure) and resp.code == Code.BUSY
            assert h.pread(4096, 0) == b"\x11" * 4096  # type: ignore[attr-defined]
            assert host.call(Remove("web-0", force=True)).body["clients"] == [os.getpid()]
            with pytest.raises(nbd.Error) as info:
                h.pread(4096, 0)  # type: ignore[attr-defined]
            assert info.value.errno == "EIO"
            # the image stays claimed while the forced-out client holds its handle
            again = host.request(Add("web-0", str(web), bytearray(web_pw)))
            assert isinstance(again, Failure) and again.code == Code.BUSY
            assert other.pread(4096, 0) == bytes(4096)  # type: ignore[attr-defined]
        finally:
            h.shutdown()  # type: ignore[attr-defined]
        # its last client gone, the image is closed: it can be served again
        deadline = time.monotonic() + 10
        while True:
            resp = host.request(Add("web-0", str(web), bytearray(web_pw)))
            if isinstance(resp, Ok) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert isinstance(resp, Ok), resp
        h = nbd_open(host, "web-0")
        assert h.pread(4096, 0) == b"\x11" * 4096  # type: ignore[attr-defined]
        h.shutdown()  # type: ignore[attr-defined]
        other.shutdown()  # type: ignore[attr-defined]


def test_a_failing_export_does_not_disturb_another(
    two: dict[str, tuple[Path, bytes]], sockdir: Path
) -> None:
    """web-0's image is truncated under it (its reads fail), db-0 reads and writes on."""
    import nbd

    (web, web_pw), (db, db_pw) = two["web-0"], two["db-0"]
    with host_server(sockdir) as host:
        add(host, "web-0", web, web_pw)
        add(host, "db-0", db, db_pw)
        h, other = nbd_open(host, "web-0"), nbd_open(host, "db-0")
        try:
            os.truncate(web, web.stat().st_size - 2 * MIB)  # the last 2 MiB of its payload
            for _ in range(3):
                with pytest.raises(nbd.Error):
                    h.pread(MIB, 3 * MIB)  # type: ignore[attr-defined]
                with pytest.raises(nbd.Error):
                    h.pread(4096, SIZE)  # type: ignore[attr-defined] - beyond the disk
                data = os.urandom(MIB)
                other.pwrite(data, 2 * MIB)  # type: ignore[attr-defined]
                other.flush()  # type: ignore[attr-defined]
                assert other.pread(MIB, 2 * MIB) == data  # type: ignore[attr-defined]
            assert h.pread(4096, 0) == bytes(4096)  # type: ignore[attr-defined]
        finally:
            h.shutdown()  # type: ignore[attr-defined]
            other.shutdown()  # type: ignore[attr-defined]
        assert host.call(Ping()).body["pid"] == host.pid()


def test_fence_pipe_per_export(two: dict[str, tuple[Path, bytes]], sockdir: Path) -> None:
    import nbd

    (web, web_pw), (db, db_pw) = two["web-0"], two["db-0"]
    with host_server(sockdir) as host:
        r, w = os.pipe()
        with host.client() as c:
            c.call(Add("web-0", str(web), bytearray(web_pw), fence=True), fence_fd=r)
        os.close(r)
        add(host, "db-0", db, db_pw)
        h, other = nbd_open(host, "web-0"), nbd_open(host, "db-0")
        try:
            assert h.pread(4096, 0) == bytes(4096)  # type: ignore[attr-defined]
            os.close(w)  # the lease holder fenced (or died)
            with pytest.raises(nbd.Error) as info:
                h.pread(4096, 0)  # type: ignore[attr-defined]
            assert info.value.errno == "EIO"
            assert other.pread(4096, 0) == bytes(4096)  # type: ignore[attr-defined]
        finally:
            h.shutdown()  # type: ignore[attr-defined]
            other.shutdown()  # type: ignore[attr-defined]
        # fence: true without the descriptor is refused, nothing is added
        line = Add("x", str(db), bytearray(db_pw), fence=True)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(host.control)
            s.sendall(encode(line))
            resp = parse_response(s.recv(65536))
        assert isinstance(resp, Failure) and "needs the pipe's read end" in resp.error
        assert [e.name for e in host.call(List()).exports()] == ["db-0", "web-0"]


def test_control_socket_refuses_another_uid(sockdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid (CI runs as root)")
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\n"
        "except OSError as e:\n print('connect', e.errno); raise SystemExit\n"
        "try:\n s.sendall(b'{\"op\":\"ping\"}\\n')\n print('got', repr(s.recv(100)))\n"
        "except (BrokenPipeError, ConnectionResetError):\n print('got reset')\n"
    )
    os.chmod(sockdir, 0o755)
    with host_server(sockdir) as host:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                "/usr/bin/python3", "-c", probe, host.control]  # fmt: skip
        # the socket file is 0660 root: another user cannot even connect
        assert oct(os.stat(host.control).st_mode & 0o777) == "0o660"
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == f"connect {errno.EACCES}", r
        # made reachable by mistake, the kernel's peer credentials still keep it out
        os.chmod(host.control, 0o666)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() in ("got b''", "got reset"), r  # closed, nothing answered
        assert "vmshield: control: refused pid" in host.log()
        assert "(uid 65534): only root" in host.log()
        assert host.call(Ping()).body["pid"] == host.pid()  # root still gets in


def test_peer_rule() -> None:
    me = os.geteuid()
    assert may_control(0, 0, [], None) and may_control(me, me, [], None)
    assert not may_control(65534, 65534, [], None)
    assert may_control(65534, 1234, [], 1234) and may_control(65534, 1, [5, 1234], 1234)
    assert not may_control(65534, 1, [5], 1234)


def test_host_server_locks_its_memory_and_bad_parameters_are_one_line(
    two: dict[str, tuple[Path, bytes]], sockdir: Path, keyfile: Path
) -> None:
    (web, web_pw) = two["web-0"]
    with host_server(sockdir) as host:
        add(host, "web-0", web, web_pw)
        status = Path(f"/proc/{host.pid()}/status").read_text()
        locked = int(next(x for x in status.splitlines() if x.startswith("VmLck:")).split()[1])
        if os.geteuid() == 0:
            assert locked > 0, status  # mlockall after the fork: the keys never reach swap
        with pytest.raises(HostUnavailable):
            HostClient(str(sockdir / "nothing.sock"))
    for extra in (f"image={web}", f"passphrase=+{keyfile}", "bind=" + VM_A, "discard=unmap"):
        r = subprocess.run(
            ["nbdkit", "-f", "-U", str(sockdir / "x.sock"), "python", PLUGIN,
             f"control={sockdir / 'c.sock'}", extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 1
        assert "belongs in the add request" in r.stderr and "Traceback" not in r.stderr
    # a control socket another server answers on is not taken over
    with host_server(sockdir) as host:
        r = subprocess.run(
            ["nbdkit", "-f", "-U", str(sockdir / "y.sock"), "python", PLUGIN,
             f"control={host.control}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 1 and "another host server is running on it" in r.stderr
        assert host.call(Ping()).body["pid"] == host.pid()


def _writer(
    host: Host, export: str, acked: dict[int, bytes], pending: dict[int, bytes], stop: object
) -> None:
    """Writes 4 KiB blocks with FUA until the server dies; records what was acknowledged."""
    import nbd

    h = nbd_open(host, export)
    gen = 0
    try:
        while not stop.is_set():  # type: ignore[attr-defined]
            gen += 1
            block = gen * 7919 % 256
            data = f"{export}:{block}:{gen}:".encode().ljust(4096, b".")
            pending[block] = data
            h.pwrite(data, block * 4096, nbd.CMD_FLAG_FUA)  # type: ignore[attr-defined]
            acked[block] = data
            del pending[block]
    except nbd.Error:
        pass  # the server was killed under this write


def test_sigkill_of_the_host_server_loses_no_acknowledged_write(
    two: dict[str, tuple[Path, bytes]], sockdir: Path
) -> None:
    """Two exports written at once with FUA; SIGKILL; a new server, the disks added again:
    every block holds its last acknowledged write, or the one in flight at the kill."""
    import threading

    state = {n: ({}, {}) for n in two}  # type: dict[str, tuple[dict[int, bytes], dict[int, bytes]]]
    stop = threading.Event()
    with host_server(sockdir) as host:
        for name, (image, secret) in two.items():
            add(host, name, image, secret)
        threads = [threading.Thread(target=_writer, args=(host, n, *state[n], stop)) for n in two]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while min(len(a) for a, _ in state.values()) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(host.pid(), 9)
        for t in threads:
            t.join(timeout=30)
        stop.set()
    with host_server(sockdir) as host:  # the dead server's control socket is replaced
        for name, (image, secret) in two.items():
            add(host, name, image, secret)
        for name, (acked, pending) in state.items():
            assert len(acked) >= 20, name
            h = nbd_open(host, name)
            for block, data in acked.items():
                got = h.pread(4096, block * 4096)  # type: ignore[attr-defined]
                assert got == data or got == pending.get(block), (name, block)
            h.shutdown()  # type: ignore[attr-defined]


@contextmanager
def slow_file(image: Path, where: Path, delay: float) -> Iterator[Path]:
    """``image``'s bytes as a read-only file whose every uncached read takes ``delay`` seconds:
    nbdkit's file plugin behind its delay filter, mounted with nbdfuse (FUSE)."""
    mnt = where / "slow"
    mnt.mkdir()
    argv = ["nbdfuse", "-r", str(mnt), "[", "nbdkit", "-r", "--filter=delay", "file",
            str(image), f"delay-read={int(delay * 1000)}ms", "]"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (mnt / "nbd").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nbdfuse did not mount: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.05)
        yield mnt / "nbd"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_slow_export_does_not_stall_another(sockdir: Path, tmp_path: Path) -> None:
    """Every uncached read of web-0's image takes 0.3 s (FUSE over a delayed NBD server);
    while a client keeps web-0 busy, db-0's reads take milliseconds: requests to different
    exports do not wait for each other (a server that serialized them would make each db-0
    read wait up to 0.3 s)."""
    import threading

    if not os.path.exists("/dev/fuse") or shutil.which("nbdfuse") is None:
        pytest.skip("needs /dev/fuse and nbdfuse (libnbd-bin)")
    web = make_image(tmp_path / "web.img", b"pw-web", size=64 * MIB)
    db = make_image(tmp_path / "db.img", b"pw-db")
    stop = threading.Event()
    slow: list[float] = []

    def keep_busy(host: Host) -> None:
        h = nbd_open(host, "web-0")
        block = 0
        while not stop.is_set():
            block += 37
            start = time.monotonic()
            h.pread(4096, block * 4096 % (60 * MIB))  # type: ignore[attr-defined]
            slow.append(time.monotonic() - start)
        h.shutdown()  # type: ignore[attr-defined]

    with slow_file(web, tmp_path, 0.3) as slow_image, host_server(sockdir) as host:
        add(host, "web-0", slow_image, b"pw-web", readonly=True)
        add(host, "db-0", db, b"pw-db")
        busy = threading.Thread(target=keep_busy, args=(host,))
        busy.start()
        fast: list[float] = []
        try:
            h = nbd_open(host, "db-0")
            time.sleep(0.5)
            for i in range(40):
                start = time.monotonic()
                h.pread(4096, i * 4096)  # type: ignore[attr-defined]
                fast.append(time.monotonic() - start)
                time.sleep(0.02)
            h.shutdown()  # type: ignore[attr-defined]
        finally:
            stop.set()
            busy.join(timeout=30)
    assert len(slow) >= 3 and min(slow) >= 0.25, slow  # web-0 really was slow meanwhile
    # db-0 was not: serialized behind web-0, its median read took ~0.28 s here
    assert statistics.median(fast) < 0.05 and sorted(fast)[-5] < 0.2, fast
