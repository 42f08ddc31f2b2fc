"""What the owner's reply to one of QEMU's control requests must be (sans-IO, no state).

QEMU matches a control reply to its request by id alone. usbgate therefore remembers QEMU's
requests by id (usbgate.relay) and lets a reply through only if it answers that request: the
same endpoint, request, type, value and index, no more bytes than asked, and, for a standard
GET_DESCRIPTOR of something the policy judged, the bytes the probe read.
"""

from __future__ import annotations

from usbgate.probe import ProbeResult
from usbgate.usbredir.descriptors import (
    REQUEST_GET_DESCRIPTOR,
    REQUESTTYPE_IN_STANDARD_DEVICE,
    DescriptorError,
    DescriptorType,
    interface_triples_in,
)
from usbgate.usbredir.packets import ControlPacket
from usbgate.usbredir.wire import Status


def reply_problem(request: ControlPacket, reply: ControlPacket, result: ProbeResult) -> str | None:
    """Why ``reply`` must not reach QEMU as the answer to ``request``, or None if it may."""
    echoed = (reply.endpoint, reply.request, reply.requesttype, reply.value, reply.index)
    asked = (request.endpoint, request.request, request.requesttype, request.value,
             request.index)  # fmt: skip
    if echoed != asked:
        return (
            f"control reply {reply.id} does not match its request (endpoint, request, "
            f"type, value, index {_hex(echoed)}; asked {_hex(asked)})"
        )
    if reply.status != Status.SUCCESS or not reply.endpoint & 0x80:
        return None
    if reply.length > request.length:
        return f"control reply {reply.id}: {reply.length} bytes for {request.length} asked"
    if (request.request, request.requesttype) != (
        REQUEST_GET_DESCRIPTOR,
        REQUESTTYPE_IN_STANDARD_DEVICE,
    ):
        return None
    return _descriptor_problem(request, reply.data, result)


def _hex(fields: tuple[int, ...]) -> str:
    return " ".join(f"{v:#x}" for v in fields)


def _descriptor_problem(request: ControlPacket, data: bytes, result: ProbeResult) -> str | None:
    """A standard GET_DESCRIPTOR answer must be (a prefix of) what the probe read and judged."""
    dtype = request.value >> 8
    if dtype in (DescriptorType.DEVICE, DescriptorType.CONFIGURATION):
        probed = result.raw.get((request.value, 0))  # wIndex is 0 for these (USB 2.0 9.4.3)
    elif dtype == DescriptorType.STRING:
        probed = result.raw.get((request.value, request.index))
        if probed is None:
            return None  # a string the policy never read (not the serial): nothing to compare
    elif dtype == DescriptorType.OTHER_SPEED_CONFIGURATION:
        judged = set(result.interface_triples())
        try:
            extra = set(interface_triples_in(data)) - judged
        except DescriptorError as exc:
            return f"other-speed configuration: {exc}"
        if extra:
            return "other-speed configuration describes interfaces that were not judged"
        return None
    else:
        return None
    if probed is None or not probed.startswith(data):
        return f"descriptor {request.value:#06x} differs from the probed one"
    return None
