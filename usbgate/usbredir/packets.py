"""Every usbredir packet type: the ``Packet`` union and the type -> class registry.

Control packets are in usbgate.usbredir.control and .streams, data packets in .data; each class
has ``pack(caps) -> body`` and ``unpack(body, id=, caps=, sender=)`` (see controlpackets).
"""

from __future__ import annotations

from typing import TypeAlias

from usbgate.usbredir.control import (
    MAX_CAPABILITY_WORDS,
    AltSettingStatus,
    ConfigurationStatus,
    DeviceConnect,
    DeviceDisconnect,
    DeviceDisconnectAck,
    EpInfo,
    FilterFilter,
    FilterReject,
    GetAltSetting,
    GetConfiguration,
    Hello,
    Interface,
    InterfaceInfo,
    Reset,
    SetAltSetting,
    SetConfiguration,
)
from usbgate.usbredir.data import (
    BufferedBulkPacket,
    BulkPacket,
    ControlPacket,
    InterruptPacket,
    IsoPacket,
)
from usbgate.usbredir.streams import (
    AllocBulkStreams,
    BulkReceivingStatus,
    BulkStreamsStatus,
    CancelDataPacket,
    FreeBulkStreams,
    InterruptReceivingStatus,
    IsoStreamStatus,
    StartBulkReceiving,
    StartInterruptReceiving,
    StartIsoStream,
    StopBulkReceiving,
    StopInterruptReceiving,
    StopIsoStream,
)
from usbgate.usbredir.wire import PacketType

Packet: TypeAlias = (
    Hello
    | DeviceConnect
    | DeviceDisconnect
    | Reset
    | InterfaceInfo
    | EpInfo
    | SetConfiguration
    | GetConfiguration
    | ConfigurationStatus
    | SetAltSetting
    | GetAltSetting
    | AltSettingStatus
    | StartIsoStream
    | StopIsoStream
    | IsoStreamStatus
    | StartInterruptReceiving
    | StopInterruptReceiving
    | InterruptReceivingStatus
    | AllocBulkStreams
    | FreeBulkStreams
    | BulkStreamsStatus
    | CancelDataPacket
    | FilterReject
    | FilterFilter
    | DeviceDisconnectAck
    | StartBulkReceiving
    | StopBulkReceiving
    | BulkReceivingStatus
    | ControlPacket
    | BulkPacket
    | IsoPacket
    | InterruptPacket
    | BufferedBulkPacket
)

PACKET_CLASSES: dict[PacketType, type[Packet]] = {
    cls.TYPE: cls
    for cls in (
        Hello, DeviceConnect, DeviceDisconnect, Reset, InterfaceInfo, EpInfo,
        SetConfiguration, GetConfiguration, ConfigurationStatus, SetAltSetting,
        GetAltSetting, AltSettingStatus, StartIsoStream, StopIsoStream, IsoStreamStatus,
        StartInterruptReceiving, StopInterruptReceiving, InterruptReceivingStatus,
        AllocBulkStreams, FreeBulkStreams, BulkStreamsStatus, CancelDataPacket, FilterReject,
        FilterFilter, DeviceDisconnectAck, StartBulkReceiving, StopBulkReceiving,
        BulkReceivingStatus, ControlPacket, BulkPacket, IsoPacket, InterruptPacket,
        BufferedBulkPacket,
    )
}  # fmt: skip

__all__ = [
    "MAX_CAPABILITY_WORDS",
    "PACKET_CLASSES",
    "AllocBulkStreams",
    "AltSettingStatus",
    "BufferedBulkPacket",
    "BulkPacket",
    "BulkReceivingStatus",
    "BulkStreamsStatus",
    "CancelDataPacket",
    "ConfigurationStatus",
    "ControlPacket",
    "DeviceConnect",
    "DeviceDisconnect",
    "DeviceDisconnectAck",
    "EpInfo",
    "FilterFilter",
    "FilterReject",
    "FreeBulkStreams",
    "GetAltSetting",
    "GetConfiguration",
    "Hello",
    "Interface",
    "InterfaceInfo",
    "InterruptPacket",
    "InterruptReceivingStatus",
    "IsoPacket",
    "IsoStreamStatus",
    "Packet",
    "Reset",
    "SetAltSetting",
    "SetConfiguration",
    "StartBulkReceiving",
    "StartInterruptReceiving",
    "StartIsoStream",
    "StopBulkReceiving",
    "StopInterruptReceiving",
    "StopIsoStream",
]
