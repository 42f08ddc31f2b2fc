"""``tcp:HOST:PORT`` and ``unix:PATH`` endpoints: parsing, connecting, listening."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# Socket read size and stream buffer limit: bigger than any usbredir packet header + bulk chunk.
READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class Address:
    """A stream endpoint: ``kind`` is "tcp" (host, port) or "unix" (path)."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str) -> Address:
    """``tcp:HOST:PORT`` (IPv6 hosts in brackets) or ``unix:PATH``; ValueError otherwise."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"{text!r}: expected tcp:HOST:PORT or unix:PATH")
    if kind == "unix":
        if len(os.fsencode(rest)) > 107:
            raise ValueError(f"{text!r}: unix socket paths are limited to 107 bytes")
        return Address("unix", path=rest)
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r}: expected tcp:HOST:PORT with a port number")
        host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
        return Address("tcp", host=host, port=int(port))
    raise ValueError(f"{text!r}: unknown address kind {kind!r} (use tcp: or unix:)")


async def open_stream(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.kind == "unix":
        return await asyncio.open_unix_connection(address.path, limit=READ_SIZE)
    return await asyncio.open_connection(address.host, address.port, limit=READ_SIZE)


async def start_server(address: Address, handler: StreamHandler) -> asyncio.Server:
    """Listen on ``address``; a stale unix socket file left by a dead gateway is replaced."""
    if address.kind == "unix":
        path = Path(address.path)
        if path.is_socket():
            path.unlink()
        return await asyncio.start_unix_server(handler, address.path, limit=READ_SIZE)
    return await asyncio.start_server(handler, address.host, address.port, limit=READ_SIZE)
