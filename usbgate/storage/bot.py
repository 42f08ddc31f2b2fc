"""USB Mass Storage Bulk-Only Transport (BOT, "usbmassbulk_10"), sans-IO.

The host sends a 31-byte Command Block Wrapper on the bulk-out endpoint, moves the data (either
direction), then reads a 13-byte Command Status Wrapper from bulk-in. ``BulkOnlyTransport``
turns bulk transfers into SCSI commands for a ``ScsiDisk`` and back:

    status = bot.bulk_out(data)            # a bulk-out transfer arrived
    status, data = bot.bulk_in(length)     # the host asks for up to `length` bytes

Halts follow the spec (section 6.6): a failed data-in command or an invalid CBW stalls the
endpoint(s) until the host clears the halt (CLEAR_FEATURE ENDPOINT_HALT: ``clear_halt``); an
invalid CBW needs a Bulk-Only Mass Storage Reset (``reset``) before the next CBW.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from usbgate.storage.scsi import CHECK_CONDITION, GOOD, MAX_TRANSFER, ScsiDisk, ScsiReply

# struct CBW { u32 dCBWSignature "USBC"; u32 dCBWTag; u32 dCBWDataTransferLength;
#              u8 bmCBWFlags (bit 7: data-in); u8 bCBWLUN; u8 bCBWCBLength; u8 CBWCB[16]; }
CBW = struct.Struct("<IIIBBB16s")
CBW_SIGNATURE = 0x43425355
# struct CSW { u32 dCSWSignature "USBS"; u32 dCSWTag; u32 dCSWDataResidue; u8 bCSWStatus; }
CSW = struct.Struct("<IIIB")
CSW_SIGNATURE = 0x53425355

# Class-specific requests (BOT 3.1, 3.2) on the interface.
REQUEST_RESET = 0xFF
REQUEST_GET_MAX_LUN = 0xFE


class CswStatus(enum.IntEnum):
    """bCSWStatus."""

    PASSED = 0
    """The command succeeded."""
    FAILED = 1
    """The command failed: the host asks REQUEST SENSE."""
    PHASE_ERROR = 2
    """The host and device disagree about the data phase: reset recovery."""


class Stage(enum.Enum):
    """Where the transport is in the command/data/status cycle."""

    COMMAND = "command"
    """Waiting for a CBW."""
    DATA_OUT = "data-out"
    """Collecting the data of a data-out command."""
    DATA_IN = "data-in"
    """Sending the data of a data-in command."""
    STATUS = "status"
    """The CSW is ready to be read."""
    NEEDS_RESET = "needs-reset"
    """An invalid CBW was seen: stalled until a Bulk-Only Mass Storage Reset."""


class Transfer(enum.Enum):
    """What a bulk transfer came to (maps to usbredir's status field)."""

    OK = "ok"
    """Transferred."""
    STALL = "stall"
    """The endpoint is halted."""


@dataclass
class _Command:
    tag: int
    length: int  # dCBWDataTransferLength: what the host expects to move
    cdb: bytes
    data: bytearray  # data-out collected so far, or data-in still to send
    moved: int = 0
    status: CswStatus = CswStatus.PASSED


class BulkOnlyTransport:
    """The bulk endpoints of a one-LUN mass-storage interface in front of a ScsiDisk."""

    def __init__(self, disk: ScsiDisk) -> None:
        self.disk = disk
        self.stage = Stage.COMMAND
        self.halted_in = False
        self.halted_out = False
        self._cmd: _Command | None = None

    # -- control requests ---------------------------------------------------------------------

    def clear_halt(self, endpoint_in: bool) -> None:
        if endpoint_in:
            self.halted_in = False
        else:
            self.halted_out = False

    def reset(self) -> None:
        """Bulk-Only Mass Storage Reset: ready for the next CBW (halts stay until cleared)."""
        self.stage = Stage.COMMAND
        self._cmd = None

    # -- bulk transfers -----------------------------------------------------------------------

    def bulk_out(self, data: bytes) -> Transfer:
        if self.halted_out:
            return Transfer.STALL
        if self.stage is Stage.COMMAND:
            return self._command(data)
        cmd = self._cmd
        if self.stage is Stage.DATA_OUT and cmd is not None:
            take = min(len(data), cmd.length - cmd.moved)
            keep = max(0, min(take, MAX_TRANSFER - len(cmd.data)))  # beyond: refused anyway
            cmd.data += data[:keep]
            cmd.moved += take
            if cmd.moved >= cmd.length:
                self._finish_data_out(cmd)
            return Transfer.OK
        # Data-out in any other stage: the host is out of step with us.
        self.halted_out = True
        return Transfer.STALL

    def bulk_in(self, length: int) -> tuple[Transfer, bytes]:
        if self.halted_in:
            return Transfer.STALL, b""
        cmd = self._cmd
        if self.stage is Stage.DATA_IN and cmd is not None:
            chunk = bytes(cmd.data[:length])
            del cmd.data[:length]
            cmd.moved += len(chunk)
            if not cmd.data:
                # Everything we had is sent; a short (or exact) transfer ends the data phase.
                self.stage = Stage.STATUS
            return Transfer.OK, chunk
        if self.stage is Stage.STATUS and cmd is not None:
            if length < CSW.size:
                self.halted_in = True
                return Transfer.STALL, b""
            csw = CSW.pack(CSW_SIGNATURE, cmd.tag, cmd.length - cmd.moved, cmd.status)
            self.stage, self._cmd = Stage.COMMAND, None
            return Transfer.OK, csw
        self.halted_in = True
        return Transfer.STALL, b""

    # -- internals ----------------------------------------------------------------------------

    def _command(self, data: bytes) -> Transfer:
        if len(data) != CBW.size:
            return self._invalid_cbw()
        signature, tag, length, flags, lun, cb_length, cb = CBW.unpack(data)
        if signature != CBW_SIGNATURE or lun != 0 or not 1 <= cb_length <= 16:
            return self._invalid_cbw()
        cdb = cb[:cb_length]
        data_in = bool(flags & 0x80)
        cmd = _Command(tag, length, cdb, bytearray())
        self._cmd = cmd
        if length == 0:
            self._settle(cmd, self.disk.execute(cdb), expected_in=0)
            self.stage = Stage.STATUS
        elif not data_in:
            self.stage = Stage.DATA_OUT
        else:
            if ScsiDisk.is_data_out(cdb):  # host wants data in, command writes: phase error
                cmd.status = CswStatus.PHASE_ERROR
                self.stage, self.halted_in = Stage.STATUS, True
                return Transfer.OK
            reply = self.disk.execute(cdb)
            self._settle(cmd, reply, expected_in=length)
            if reply.status != GOOD or not cmd.data:
                # No data for the host: stall bulk-in; the host clears it and reads the CSW.
                self.stage, self.halted_in = Stage.STATUS, True
            else:
                self.stage = Stage.DATA_IN
        return Transfer.OK

    def _settle(self, cmd: _Command, reply: ScsiReply, *, expected_in: int) -> None:
        if reply.status == CHECK_CONDITION:
            cmd.status = CswStatus.FAILED
        elif expected_in:
            cmd.data = bytearray(reply.data[:expected_in])

    def _finish_data_out(self, cmd: _Command) -> None:
        cdb = cmd.cdb
        if not ScsiDisk.is_data_out(cdb):
            # Host sent data to a command that takes none: drop it, fail the command.
            reply = self.disk.execute(cdb)
            cmd.status = CswStatus.PASSED if reply.status == GOOD else CswStatus.FAILED
        else:
            want = ScsiDisk.data_out_length(cdb) or 0
            reply = self.disk.execute(cdb, bytes(cmd.data[:want]))
            cmd.status = CswStatus.PASSED if reply.status == GOOD else CswStatus.FAILED
        cmd.data = bytearray()
        self.stage = Stage.STATUS

    def _invalid_cbw(self) -> Transfer:
        self.stage = Stage.NEEDS_RESET
        self._cmd = None
        self.halted_in = self.halted_out = True
        return Transfer.STALL
