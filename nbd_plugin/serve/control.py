"""The host disk server's control protocol, sans-IO: requests, responses, line framing.

One host nbdkit serves many disks as NBD exports; the keystore side adds and removes them
at run time over a unix socket (``serve/hostserver.py`` serves it, ``serve/hostclient.py``
talks to it). On that socket each message is one JSON object on one line (UTF-8, at most
``MAX_LINE`` bytes with its newline). This module owns no socket: it turns bytes into typed
requests and responses and back, and nothing else, so every check is testable (and fuzzed)
without a server.

Requests::

    {"op":"add","name":NAME,"image":PATH,"passphrase_b64":B64,"readonly":bool,
     "keyslot":int|null,"bind":{"uuid":UUID,"domain":NAME|null}|null,
     "discard":"ignore"|"unmap","fence":bool}         (discard, fence optional)
    {"op":"remove","name":NAME,"force":bool}
    {"op":"list"}
    {"op":"ping"}
    {"op":"events","after":int}                        (refusals logged after seq `after`)

``fence: true``: the lease holder's pipe (read end) comes with the add line as an SCM_RIGHTS
descriptor; once its write end closes, the export's I/O fails with EIO (``serve/fence.py``).

Responses: ``{"ok":true,...}`` or ``{"ok":false,"error":"one line","code":CODE}`` with CODE one
of `Code`. An export name is ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``.

No error message quotes what the peer sent (a value, a key): a client that puts the
passphrase in the wrong place must not see it echoed, nor find it in a log. Messages name the
field and what is expected. The passphrase never appears in a repr either. It is decoded into a
``bytearray`` the server overwrites once the KDF ran; the JSON text and the base64 string it
came from are immutable Python objects that cannot be cleared (they are freed, not wiped).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any

from nbd_plugin import secrets
from nbd_plugin.serve.peers import parse_uuid

#: the longest request line, newline included
MAX_LINE = 64 * 1024
#: the longest response line a client accepts (a list of many exports)
MAX_RESPONSE = 16 * 1024 * 1024
#: how an export is named (it is also the NBD export name QEMU asks for)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DISCARD_POLICIES = ("ignore", "unmap")
MAX_KEYSLOT = 31


class Code(enum.StrEnum):
    """Why a request failed, for the caller's program (the message is for people)."""

    #: no export of that name
    NOT_FOUND = "not-found"
    #: an export of that name is already served
    EXISTS = "exists"
    #: no keyslot opens with this passphrase (wrong or damaged: no oracle)
    BAD_PASSPHRASE = "bad-passphrase"
    #: a client is connected (remove without force), or the image is held elsewhere
    BUSY = "busy"
    #: the request is malformed or a value is out of range
    INVALID = "invalid"
    #: the image cannot be read or is not a usable LUKS container
    IO = "io"


class ProtocolError(ValueError):
    """The peer broke the framing (a line too long, not UTF-8 JSON): close the connection."""


class RequestInvalid(ValueError):
    """A well-framed request that is not valid; answer ``code: invalid`` and go on."""


def check_name(name: object) -> str:
    """The export name, or RequestInvalid."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RequestInvalid("name: use 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)")
    return name


# ---- requests ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bind:
    """The VM whose QEMU alone may open an export (see serve/peers.py)."""

    uuid: str
    domain: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "domain": self.domain}


@dataclass(frozen=True)
class Add:
    """Unlock IMAGE with the passphrase (the KDF runs in the server) and serve it as NAME."""

    name: str
    image: str
    passphrase: bytearray = field(repr=False)
    readonly: bool = False
    keyslot: int | None = None
    bind: Bind | None = None
    discard: str = "ignore"
    fence: bool = False  #: a pipe's read end comes with the request (SCM_RIGHTS)

    def wipe(self) -> None:
        """Overwrite the passphrase bytes (the server calls it once the key is derived)."""
        self.passphrase[:] = bytes(len(self.passphrase))

    def to_json(self) -> dict[str, Any]:
        return {
            "op": "add",
            "name": self.name,
            "image": self.image,
            "passphrase_b64": base64.b64encode(self.passphrase).decode("ascii"),
            "readonly": self.readonly,
            "keyslot": self.keyslot,
            "bind": None if self.bind is None else self.bind.to_json(),
            "discard": self.discard,
            "fence": self.fence,
        }


@dataclass(frozen=True)
class Remove:
    """Stop serving NAME; refused while a client is connected unless ``force``."""

    name: str
    force: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"op": "remove", "name": self.name, "force": self.force}


@dataclass(frozen=True)
class List:
    """Every export with its image, mode, binding, clients and byte counts."""

    def to_json(self) -> dict[str, Any]:
        return {"op": "list"}


@dataclass(frozen=True)
class Ping:
    """The server's pid, version and uptime."""

    def to_json(self) -> dict[str, Any]:
        return {"op": "ping"}


@dataclass(frozen=True)
class Events:
    """The server's event log (refused clients, ...) after sequence number ``after``."""

    after: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"op": "events", "after": self.after}


Request = Add | Remove | List | Ping | Events


# ---- response payloads ---------------------------------------------------------------------
@dataclass(frozen=True)
class ExportInfo:
    """One served export, as ``list`` reports it."""

    name: str
    image: str
    readonly: bool
    bind: Bind | None
    since: float  #: when it was added (seconds since the epoch)
    clients: tuple[int, ...]  #: pids of the connected clients (-1: unknown)
    bytes_read: int
    bytes_written: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "readonly": self.readonly,
            "bind": None if self.bind is None else self.bind.to_json(),
            "since": self.since,
            "clients": list(self.clients),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
        }

    @classmethod
    def from_json(cls, obj: Any) -> ExportInfo:
        o = _object(obj, "export")
        return cls(
            name=_str(o, "name"),
            image=_str(o, "image"),
            readonly=_bool(o, "readonly"),
            bind=_bind(o.get("bind")),
            since=_number(o, "since"),
            clients=tuple(_int_list(o, "clients")),
            bytes_read=_int(o, "bytes_read"),
            bytes_written=_int(o, "bytes_written"),
        )


@dataclass(frozen=True)
class Event:
    """Something the keystore side audits: ``kind`` "refused" (a client not allowed to open
    ``export``; ``pid`` the client, ``reason`` one line)."""

    seq: int
    time: float
    kind: str
    export: str
    pid: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "export": self.export,
            "pid": self.pid,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Event:
        o = _object(obj, "event")
        return cls(
            seq=_int(o, "seq"),
            time=_number(o, "time"),
            kind=_str(o, "kind"),
            export=_str(o, "export"),
            pid=_int(o, "pid"),
            reason=_str(o, "reason"),
        )


@dataclass(frozen=True)
class Ok:
    """A successful response; ``body`` holds the op's fields (JSON values)."""

    body: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, **self.body}

    # typed views of the bodies the server sends
    def exports(self) -> list[ExportInfo]:
        raw = self.body.get("exports")
        if not isinstance(raw, list):
            raise ProtocolError("response: exports is not a list")
        try:
            return [ExportInfo.from_json(x) for x in raw]
        except RequestInvalid as exc:
            raise ProtocolError(f"response: {exc}") from None

    def events(self) -> list[Event]:
        raw = self.body.get("events")
        if not isinstance(raw, list):
            raise ProtocolError("response: events is not a list")
        try:
            return [Event.from_json(x) for x in raw]
        except RequestInvalid as exc:
            raise ProtocolError(f"response: {exc}") from None


@dataclass(frozen=True)
class Failure:
    """A failed request: one line for people, a `Code` for programs."""

    code: Code
    error: str

    def __post_init__(self) -> None:
        if "\n" in self.error or "\r" in self.error:
            object.__setattr__(self, "error", " ".join(self.error.split()))

    def to_json(self) -> dict[str, Any]:
        return {"ok": False, "error": self.error, "code": self.code.value}


Response = Ok | Failure


# ---- encoding ------------------------------------------------------------------------------
def encode(message: Request | Response) -> bytes:
    """One line of compact JSON, newline included."""
    text = json.dumps(message.to_json(), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("a key given twice")
        out[key] = value
    return out


def _load(line: bytes, limit: int) -> dict[str, Any]:
    """The JSON object of one line (trailing newline optional), or ProtocolError."""
    if len(line) > limit:
        raise ProtocolError(f"a line longer than {limit} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("a line that is not UTF-8") from None
    if text.endswith("\n"):
        text = text[:-1]
    if "\n" in text:
        raise ProtocolError("several lines where one was expected")
    try:
        obj = json.loads(text, object_pairs_hook=_unique, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    except ValueError as exc:
        # json's messages name a position, never the text; ours name a key (cut short)
        reason = str(exc).splitlines()[0] if str(exc) else "malformed"
        raise ProtocolError(f"not JSON ({reason[:80]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a line that is not a JSON object")
    try:  # a \ud800 escape decodes to a lone surrogate: not text, and no path either
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("a string with a lone surrogate escape (not UTF-8 text)") from None
    return obj


# small typed getters: a missing key or a wrong type is RequestInvalid naming the key
def _object(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RequestInvalid(f"{what}: expected a JSON object")
    return obj


def _str(o: dict[str, Any], key: str) -> str:
    v = o.get(key)
    if not isinstance(v, str):
        raise RequestInvalid(f"{key}: expected a string")
    return v


def _bool(o: dict[str, Any], key: str, default: bool | None = None) -> bool:
    v = o.get(key, default)
    if not isinstance(v, bool):
        raise RequestInvalid(f"{key}: expected true or false")
    return v


def _int(o: dict[str, Any], key: str) -> int:
    v = o.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise RequestInvalid(f"{key}: expected an integer")
    return v


def _number(o: dict[str, Any], key: str) -> float:
    v = o.get(key)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise RequestInvalid(f"{key}: expected a number")
    return float(v)


def _int_list(o: dict[str, Any], key: str) -> list[int]:
    v = o.get(key)
    if not isinstance(v, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in v
    ):
        raise RequestInvalid(f"{key}: expected a list of integers")
    return v


def _bind(v: Any) -> Bind | None:
    if v is None:
        return None
    o = _object(v, "bind")
    extra = set(o) - {"uuid", "domain"}
    if extra:
        raise RequestInvalid("bind: an unknown key (known: uuid, domain)")
    raw = o.get("uuid")
    if not isinstance(raw, str):
        raise RequestInvalid("bind.uuid: expected the VM's uuid")
    try:
        uuid = parse_uuid(raw)
    except ValueError:
        raise RequestInvalid("bind.uuid: not a uuid") from None
    domain = o.get("domain")
    if domain is not None and (
        not isinstance(domain, str) or not domain or not domain.isprintable()
    ):
        raise RequestInvalid("bind.domain: expected a libvirt domain name or null")
    return Bind(uuid, domain)


_KEYS: dict[str, tuple[set[str], set[str]]] = {
    # op: (required keys, optional keys), "op" itself not listed
    "add": (
        {"name", "image", "passphrase_b64"},
        {"readonly", "keyslot", "bind", "discard", "fence"},
    ),
    "remove": ({"name"}, {"force"}),
    "list": (set(), set()),
    "ping": (set(), set()),
    "events": (set(), {"after"}),
}


def parse_request(line: bytes) -> Request:
    """One request line -> a Request.

    ProtocolError if the line is not a UTF-8 JSON object within MAX_LINE bytes (the server
    answers it and closes); RequestInvalid (one line, never the passphrase) if the object is
    not a valid request (the server answers it and reads the next line).
    """
    o = _load(line, MAX_LINE)
    op = o.get("op")
    if not isinstance(op, str) or op not in _KEYS:
        raise RequestInvalid(f"op: use one of {', '.join(_KEYS)}")
    required, optional = _KEYS[op]
    keys = set(o) - {"op"}
    missing = required - keys
    if missing:
        raise RequestInvalid(f"{op}: {sorted(missing)[0]} is required")
    unknown = keys - required - optional
    if unknown:
        known = ", ".join(sorted(required | optional)) or "none"
        raise RequestInvalid(f"{op}: an unknown key (known: {known})")
    if op == "add":
        return _parse_add(o)
    if op == "remove":
        return Remove(check_name(o["name"]), _bool(o, "force", False))
    if op == "events":
        after = o.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise RequestInvalid("events: after must be an integer >= 0")
        return Events(after)
    return List() if op == "list" else Ping()


def _parse_add(o: dict[str, Any]) -> Add:
    name = check_name(o["name"])
    image = o["image"]
    if not isinstance(image, str) or not image.startswith("/") or "\0" in image:
        raise RequestInvalid("add: image must be an absolute path")
    if len(image.encode("utf-8")) > 4096:
        raise RequestInvalid("add: image path longer than 4096 bytes")
    readonly = _bool(o, "readonly", False)
    keyslot = o.get("keyslot")
    if keyslot is not None and (
        not isinstance(keyslot, int) or isinstance(keyslot, bool) or not 0 <= keyslot <= MAX_KEYSLOT
    ):
        raise RequestInvalid(f"add: keyslot must be null or 0 to {MAX_KEYSLOT}")
    discard = o.get("discard", "ignore")
    if discard not in DISCARD_POLICIES:
        raise RequestInvalid(f"add: discard must be one of {', '.join(DISCARD_POLICIES)}")
    bind = _bind(o.get("bind"))
    fence = _bool(o, "fence", False)
    raw = o["passphrase_b64"]
    # checked last, so no error above runs while a decoded passphrase exists
    if not isinstance(raw, str):
        raise RequestInvalid("add: passphrase_b64 must be a base64 string")
    try:
        passphrase = bytearray(base64.b64decode(raw.encode("ascii"), validate=True))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise RequestInvalid("add: passphrase_b64 is not valid base64") from None
    if not passphrase or len(passphrase) > secrets.MAX_KEY_FILE:  # the key-file rules
        secrets.wipe(passphrase)
        raise RequestInvalid(f"add: the passphrase must be 1 to {secrets.MAX_KEY_FILE} bytes")
    return Add(name, image, passphrase, readonly, keyslot, bind, str(discard), fence)


def parse_response(line: bytes) -> Response:
    """One response line -> Ok or Failure (ProtocolError if it is neither)."""
    o = _load(line, MAX_RESPONSE)
    ok = o.pop("ok", None)
    if ok is True:
        return Ok(o)
    if ok is False:
        error, code = o.get("error"), o.get("code")
        if not isinstance(error, str) or not isinstance(code, str):
            raise ProtocolError("a failure response without an error message")
        try:
            return Failure(Code(code), error)
        except ValueError:
            raise ProtocolError("a failure response with an unknown code") from None
    raise ProtocolError("a response without ok: true or false")


# ---- framing -------------------------------------------------------------------------------
class LineBuffer:
    """Splits received bytes into lines, refusing a line longer than ``limit`` bytes.

    ``receive_data(b"")`` marks the end of the stream; ``next_line()`` then returns the
    remaining lines and None; an incomplete last line is a ProtocolError (h11's rule: a
    truncated message is an error, not a message).
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._scanned = 0
        self._closed = False

    def receive_data(self, data: bytes) -> None:
        if self._closed and data:
            raise ProtocolError("data after the end of the stream")
        if not data:
            self._closed = True
            return
        self._buf += data

    @property
    def closed(self) -> bool:
        """Whether the end of the stream was received and every complete line returned."""
        return self._closed and not self._buf

    def next_line(self) -> bytes | None:
        """The next complete line (with its newline), or None if more data is needed.

        None with ``closed`` True: the stream ended cleanly.
        """
        end = self._buf.find(b"\n", self._scanned)
        if end < 0:
            if len(self._buf) >= self._limit:
                raise ProtocolError(f"a line longer than {self._limit} bytes")
            self._scanned = len(self._buf)
            if self._closed and self._buf:
                self._buf.clear()
                raise ProtocolError("the stream ended in the middle of a line")
            return None
        if end + 1 > self._limit:
            raise ProtocolError(f"a line longer than {self._limit} bytes")
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        self._scanned = 0
        return line
