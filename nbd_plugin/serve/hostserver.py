"""The host disk server's control socket: the I/O around ``serve/control.py``.

The plugin in host mode (``nbdkit ... python plugin.py control=SOCK``) binds SOCK before
nbdkit forks (so the socket exists once nbdkit is up) and starts the accepting thread after
the fork (threads do not survive it). Each connection gets a thread that reads request lines,
runs them on `Exports` and writes one response line each.

Who may connect: the kernel says who the peer is (SO_PEERCRED, SO_PEERGROUPS): root, the
server's own user, or a member of the ``vmshield`` group; anyone else is logged and closed
before a byte is read. The socket file is mode 0660, group ``vmshield`` when that group
exists and the server runs as root. A line longer than 64 KiB, or bytes that are not JSON,
end that connection after one ``invalid`` response; nothing else is disturbed. An ``add``
line may carry one descriptor (SCM_RIGHTS): the lease holder's fence pipe.
"""

from __future__ import annotations

import array
import contextlib
import errno
import grp
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable

from nbd_plugin.errors import VmshieldError
from nbd_plugin.serve.connlog import stamp
from nbd_plugin.serve.control import (
    MAX_LINE,
    Add,
    Code,
    Failure,
    LineBuffer,
    ProtocolError,
    RequestInvalid,
    Response,
    encode,
    parse_request,
)
from nbd_plugin.serve.exports import Exports, stderr_line

GROUP = "vmshield"
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
#: control connections served at once (each is a thread; an add's KDF runs in it)
MAX_CLIENTS = 16
#: a connected client that sends nothing for this long is closed
IDLE_TIMEOUT = 300.0
#: descriptors accepted with one message (an add carries at most one)
MAX_FDS = 4


class ControlSocketError(VmshieldError):
    """The control socket cannot be set up (path in use, not a socket, no permission)."""


def group_gid(name: str = GROUP) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int, list[int]]:
    """(pid, uid, gid, supplementary gids) of a unix socket's peer, from the kernel."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    groups: list[int] = []
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = list(array.array("I", raw[: len(raw) // 4 * 4]))
    return pid, uid, gid, groups


def may_control(uid: int, gid: int, groups: list[int], allowed_gid: int | None) -> bool:
    """Root, our own user, or a member of the vmshield group."""
    if uid in (0, os.geteuid()):
        return True
    return allowed_gid is not None and (gid == allowed_gid or allowed_gid in groups)


class ControlServer:
    """The listening control socket and its threads."""

    def __init__(
        self,
        path: str,
        exports: Exports,
        *,
        log: Callable[[str], None] = stderr_line,
        group: str = GROUP,
    ) -> None:
        self.path = os.path.abspath(path)
        self.exports = exports
        self._log = log
        self._gid = group_gid(group)
        self._listener: socket.socket | None = None
        self._active = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stopping = False

    # ---- before the fork -----------------------------------------------------------------
    def bind(self) -> None:
        """Create the socket file (0660; group vmshield when root); ControlSocketError if
        another server answers on it or the path is something else."""
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o117)  # the file is born 0660: never reachable by others
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise ControlSocketError(f"control={self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        try:
            if os.geteuid() == 0 and self._gid is not None:
                os.chown(self.path, 0, self._gid)
            os.chmod(self.path, 0o660)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise ControlSocketError(f"control={self.path}: {exc.strerror}") from None
        self._listener = sock

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"control={self.path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2)
            probe.connect(self.path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlSocketError(f"control={self.path}: {exc.strerror}") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # left by a server that died
            return
        finally:
            probe.close()
        raise ControlSocketError(
            f"control={self.path}: another host server is running on it; stop it first"
        )

    # ---- after the fork ------------------------------------------------------------------
    def start(self) -> None:
        if self._listener is None:
            raise RuntimeError("bind() first")
        threading.Thread(target=self._accept_loop, name="vmshield-control", daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._stopping or exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                time.sleep(0.05)  # EMFILE, ECONNABORTED: try again, without spinning
                continue
            try:
                pid, uid, gid, groups = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            if not may_control(uid, gid, groups, self._gid):
                self._log(
                    f"{stamp(self.exports.now())} vmshield: control: refused pid {pid} "
                    f"(uid {uid}): only root, uid {os.geteuid()} or group {GROUP} may control"
                )
                conn.close()
                continue
            if not self._active.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    conn.sendall(encode(Failure(Code.BUSY, "too many control connections")))
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name=f"vmshield-control-{pid}", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(IDLE_TIMEOUT)
            self._converse(conn, fds)
        except (OSError, TimeoutError):
            pass  # the peer went away or idled: nothing to answer
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()
            self._active.release()

    def _converse(self, conn: socket.socket, fds: list[int]) -> None:
        buf = LineBuffer(MAX_LINE)
        ancillary = socket.CMSG_SPACE(MAX_FDS * 4)
        while True:
            try:
                line = buf.next_line()
            except ProtocolError as exc:
                conn.sendall(encode(Failure(Code.INVALID, str(exc))))
                return
            if line is None:
                if buf.closed:
                    return
                data, anc, flags, _ = conn.recvmsg(MAX_LINE, ancillary)
                fds.extend(_received_fds(anc))
                if flags & socket.MSG_CTRUNC:
                    conn.sendall(encode(Failure(Code.INVALID, "too many descriptors")))
                    return
                buf.receive_data(data)
                continue
            conn.sendall(encode(self._answer(line, fds)))

    def _answer(self, line: bytes, fds: list[int]) -> Response:
        try:
            request = parse_request(line)
        except (RequestInvalid, ProtocolError) as exc:
            return Failure(Code.INVALID, str(exc))
        fence_fd: int | None = None
        if isinstance(request, Add) and request.fence:
            if not fds:
                request.wipe()
                return Failure(
                    Code.INVALID, "add: fence: true needs the pipe's read end (SCM_RIGHTS)"
                )
            fence_fd = fds.pop(0)
        for fd in fds:  # descriptors nobody asked for
            with contextlib.suppress(OSError):
                os.close(fd)
        fds.clear()
        return self.exports.handle(request, fence_fd)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    out: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            out.extend(array.array("i", data[: len(data) // 4 * 4]))
    return out


class HostServer:
    """The plugin's host mode: the exports and the control socket, in nbdkit's order."""

    def __init__(
        self, control: str, *, readonly: bool, log: Callable[[str], None] = stderr_line
    ) -> None:
        self.exports = Exports(readonly=readonly, log=log)
        self.control = ControlServer(control, self.exports, log=log)

    def before_fork(self) -> None:
        self.control.bind()

    def after_fork(self) -> None:
        self.control.start()

    def cleanup(self) -> None:
        self.control.stop()
        self.exports.close_all()
