"""One request to a local control socket: a JSON object on one line, one line back.

The usbgate host's control socket is spoken this way by `usbgate host add/remove/list`, by the
libvirt hook and by `vmshield status`; they share this client so that the framing, the bound
on the answer and the one-line errors are written once.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbd_plugin.errors import VmshieldError

#: the longest answer read (bytes); a longer one is refused, not buffered
MAX_ANSWER = 1 << 20


class ControlError(VmshieldError):
    """The control socket could not be reached, or its answer was not one JSON object."""


def request(
    path: str | Path,
    message: dict[str, Any],
    *,
    timeout: float,
    limit: int = MAX_ANSWER,
    fds: Sequence[int] = (),
) -> dict[str, Any]:
    """Send `message` to the unix socket `path`; its answer (a JSON object). ControlError
    (one line, naming `path`) if it cannot be reached, closes without a line, or answers
    with more than `limit` bytes or anything but an object. `fds` go with the line
    (SCM_RIGHTS; the caller keeps and closes its own copies)."""
    data = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            line = json.dumps(message).encode() + b"\n"
            if fds:  # the descriptors ride on the first byte; the rest follows plainly
                sent = socket.send_fds(sock, [line], list(fds))
                sock.sendall(line[sent:])
            else:
                sock.sendall(line)
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > limit:
                    raise ControlError(f"{path} answered with more than {limit} bytes")
    except TimeoutError:
        raise ControlError(f"{path} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"cannot reach {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(bytes(data))
    except ValueError:
        raise ControlError(f"{path} gave no answer") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path} gave no answer")
    return reply


def call(
    path: str | Path,
    message: dict[str, Any],
    *,
    timeout: float,
    who: str,
    error: type[VmshieldError] = ControlError,
) -> dict[str, Any]:
    """`request`, to a server that answers `{"ok": true, ...}` or `{"ok": false, "error":
    REASON}`: the answer if ok. `error` (one line) otherwise: "WHO: why" if the server cannot
    be reached or gives no answer, its REASON if it refuses."""
    try:
        reply = request(path, message, timeout=timeout)
    except ControlError as exc:
        raise error(f"{who}: {exc}") from None
    if not reply.get("ok"):
        raise error(str(reply.get("error") or "refused"))
    return reply
