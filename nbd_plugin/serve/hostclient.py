"""A small blocking client of the host disk server's control socket (the keystore side uses it).

    with HostClient("/run/vmshield/nbd-control.sock") as c:
        c.call(Add("web-0", "/srv/web-0.img", bytearray(passphrase), bind=Bind(uuid, "web")))
        exports = c.call(List()).exports()

`request()` returns the response as sent (Ok or Failure); `call()` returns an Ok or raises
`HostServerError` carrying the failure's `Code`. A socket that is missing or refuses us is
`HostUnavailable` (start the server, or check the group). Each call is one line out, one line
back; an `Add` with ``fence=True`` sends the pipe's read end with its line (SCM_RIGHTS).
"""

from __future__ import annotations

import array
import socket
from types import TracebackType

from nbd_plugin.errors import ExitStatus, VmshieldError
from nbd_plugin.serve.control import (
    MAX_RESPONSE,
    Add,
    Code,
    Failure,
    LineBuffer,
    Ok,
    ProtocolError,
    Request,
    Response,
    encode,
    parse_response,
)

#: an add runs the KDF in the server (argon2 may take seconds, several adds queue)
DEFAULT_TIMEOUT = 120.0


class HostUnavailable(VmshieldError):
    """No host server answers on the control socket (not running, or not ours to use)."""

    exit_code = ExitStatus.TEMPFAIL


class HostServerError(VmshieldError):
    """The host server refused a request; ``code`` says why (control.Code)."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        if code == Code.BUSY:
            self.exit_code = ExitStatus.TEMPFAIL
        elif code == Code.BAD_PASSPHRASE:
            self.exit_code = ExitStatus.NOPERM


class HostClient:
    """One connection to the control socket."""

    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise HostUnavailable(
                f"host disk server at {path}: {exc.strerror or exc} (is it running? is this "
                "user root or in the vmshield group?)"
            ) from None
        self._sock = sock
        self._buf = LineBuffer(MAX_RESPONSE)

    def __enter__(self) -> HostClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def request(self, req: Request, *, fence_fd: int | None = None) -> Response:
        """Send one request, return its response (Ok or Failure)."""
        line = encode(req)
        fds = [fence_fd] if fence_fd is not None else []
        if isinstance(req, Add) and req.fence != bool(fds):
            raise ValueError("an Add with fence=True needs fence_fd, and only then")
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self._sock.sendmsg([line], anc)
                if sent < len(line):
                    self._sock.sendall(line[sent:])
            else:
                self._sock.sendall(line)
            return parse_response(self._read_line())
        except (OSError, ProtocolError) as exc:
            raise HostUnavailable(f"host disk server at {self.path}: {exc}") from None
        finally:
            del line  # holds the passphrase in base64 for an add: drop it now

    def call(self, req: Request, *, fence_fd: int | None = None) -> Ok:
        """Send one request; its Ok, or HostServerError."""
        resp = self.request(req, fence_fd=fence_fd)
        if isinstance(resp, Failure):
            raise HostServerError(resp.code, resp.error)
        return resp

    def _read_line(self) -> bytes:
        while True:
            line = self._buf.next_line()
            if line is not None:
                return line
            if self._buf.closed:
                raise ProtocolError("the server closed the connection")
            self._buf.receive_data(self._sock.recv(1 << 16))
