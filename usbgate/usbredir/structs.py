"""What every usbredir packet class shares: struct packing with clear errors, who may send it,
and the base of packets whose body is one fixed struct.

``pack_struct`` and ``pack_bytes`` turn struct's errors into ValueError (the caller built an
unsendable packet); ``FixedBody`` unpacks a body of exactly one struct into the dataclass's
fields and raises ``ProtocolError`` for any other length.
"""

from __future__ import annotations

import struct
from dataclasses import fields
from typing import Any, ClassVar, Self, cast

from usbgate.errors import ProtocolError
from usbgate.usbredir.wire import Capability, PacketType, Role

EITHER = frozenset({Role.HOST, Role.GUEST})
HOST_ONLY = frozenset({Role.HOST})
GUEST_ONLY = frozenset({Role.GUEST})
"""Who may send a packet type (its ``SENDERS``): either side, only the usb-host, only the guest."""


def pack_struct(wire: struct.Struct, *values: int) -> bytes:
    try:
        return wire.pack(*values)
    except struct.error as exc:
        raise ValueError(f"field out of range for {wire.format!r}: {values}") from exc


class FixedBody:
    """A packet whose body is exactly one struct of integers, in field order, and no data."""

    TYPE: ClassVar[PacketType]
    SENDERS: ClassVar[frozenset[Role]]
    WIRE: ClassVar[struct.Struct] = struct.Struct("<")

    def pack(self, caps: Capability) -> bytes:
        names = [f.name for f in fields(cast(Any, self)) if f.name != "id"]
        return pack_struct(self.WIRE, *(getattr(self, n) for n in names))

    @classmethod
    def unpack(cls, body: bytes, *, id: int, caps: Capability, sender: Role) -> Self:
        if len(body) != cls.WIRE.size:
            raise ProtocolError(
                f"{cls.TYPE.name}: body is {len(body)} bytes, expected {cls.WIRE.size}"
            )
        return cast(Self, cast(Any, cls)(*cls.WIRE.unpack(body), id=id))


def pack_bytes(wire: struct.Struct, *values: int | bytes) -> bytes:
    try:
        return wire.pack(*values)
    except (struct.error, ValueError) as exc:
        raise ValueError(f"field out of range for {wire.format!r}") from exc
