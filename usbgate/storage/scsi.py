"""A SCSI direct-access block device (SBC-3/SPC-4 subset), as a USB stick's firmware answers.

Sans-IO: ``ScsiDisk.execute(cdb, data_out)`` returns a ``ScsiReply`` (status, data, sense);
the blocks live in a ``BlockStore`` (an image file, or memory in the tests). The commands are
those Linux's sd and usb-storage send to a stick; any other operation code is answered with
CHECK CONDITION, sense ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE, as SPC requires.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass
from typing import Protocol

BLOCK_SIZE = 512
#: the most one READ or WRITE may move (16 MiB; Linux asks for at most 1 MiB of a USB stick):
#: the guest chooses the length, and a command's data sits in this process's memory whole
MAX_TRANSFER_BLOCKS = 32768
MAX_TRANSFER = MAX_TRANSFER_BLOCKS * BLOCK_SIZE


class Op(enum.IntEnum):
    """SCSI operation codes understood (SPC-4 / SBC-3)."""

    TEST_UNIT_READY = 0x00
    """Is the medium ready? (GOOD: yes)."""
    REQUEST_SENSE = 0x03
    """The sense data of the last failed command."""
    READ_6 = 0x08
    """Read blocks (21-bit LBA)."""
    WRITE_6 = 0x0A
    """Write blocks (21-bit LBA)."""
    INQUIRY = 0x12
    """Standard inquiry data or a vital product data page."""
    MODE_SELECT_6 = 0x15
    """Change mode pages (accepted, ignored: the pages are fixed)."""
    MODE_SENSE_6 = 0x1A
    """Mode parameter header (write protect) and the caching page."""
    START_STOP_UNIT = 0x1B
    """Load/eject the medium (accepted)."""
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    """Lock the medium in (accepted: a stick has no lock)."""
    READ_CAPACITY_10 = 0x25
    """Last LBA (32 bits) and block size."""
    READ_10 = 0x28
    """Read blocks (32-bit LBA)."""
    WRITE_10 = 0x2A
    """Write blocks (32-bit LBA)."""
    VERIFY_10 = 0x2F
    """Verify blocks (always fine: the image has no bad blocks)."""
    SYNCHRONIZE_CACHE_10 = 0x35
    """Flush written blocks to the image."""
    MODE_SENSE_10 = 0x5A
    """MODE SENSE with the 8-byte header."""
    READ_16 = 0x88
    """Read blocks (64-bit LBA)."""
    WRITE_16 = 0x8A
    """Write blocks (64-bit LBA)."""
    SYNCHRONIZE_CACHE_16 = 0x91
    """SYNCHRONIZE CACHE with a 64-bit LBA."""
    SERVICE_ACTION_IN_16 = 0x9E
    """Service action 0x10: READ CAPACITY(16)."""


class SenseKey(enum.IntEnum):
    """Sense keys used (SPC-4 table 51)."""

    NO_SENSE = 0x0
    """Nothing to report."""
    MEDIUM_ERROR = 0x3
    """The image could not be read or written."""
    ILLEGAL_REQUEST = 0x5
    """The command or a field of it is invalid."""


# (sense key, additional sense code, qualifier)
Sense = tuple[int, int, int]
NO_SENSE: Sense = (SenseKey.NO_SENSE, 0x00, 0x00)
INVALID_OPCODE: Sense = (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE: Sense = (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB: Sense = (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
PARAMETER_LIST_LENGTH: Sense = (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
UNRECOVERED_READ_ERROR: Sense = (SenseKey.MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR: Sense = (SenseKey.MEDIUM_ERROR, 0x0C, 0x00)

GOOD = 0x00
CHECK_CONDITION = 0x02

# CDB layouts: READ(10)/WRITE(10): op, flags, LBA u32, group, length u16, control
CDB10 = struct.Struct(">BBIBHB")
# READ(16)/WRITE(16): op, flags, LBA u64, length u32, group, control
CDB16 = struct.Struct(">BBQIBB")
CAPACITY_10 = struct.Struct(">II")
CAPACITY_16 = struct.Struct(">QI20x")

# Commands whose data flows host -> device (the rest send data to the host, or none).
DATA_OUT = frozenset({Op.WRITE_6, Op.WRITE_10, Op.WRITE_16, Op.MODE_SELECT_6})


class BlockStore(Protocol):
    """Where the blocks live."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...


class MemoryStore:
    """Blocks in a bytearray (tests)."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.size = size
        self.flushes = 0

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset : offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1


class FileStore:
    """Blocks in an image file (its size rounded down to whole blocks)."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.read_only = read_only
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(f"short read at {offset}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        done = os.pwrite(self.fd, data, offset)
        if done != len(data):
            raise OSError(f"short write at {offset}")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class ScsiReply:
    """The outcome of one command: status, data for the host (data-in), the sense set."""

    status: int
    data: bytes = b""
    sense: Sense = NO_SENSE


@dataclass
class Identity:
    """What INQUIRY reports."""

    vendor: str = "vmshield"
    product: str = "Simulated Stick"
    revision: str = "1.00"
    serial: str = "4C530001"


class ScsiDisk:
    """One logical unit: executes CDBs against a BlockStore."""

    def __init__(self, store: BlockStore, identity: Identity | None = None,
                 *, read_only: bool = False) -> None:  # fmt: skip
        if store.size < BLOCK_SIZE:
            raise ValueError(f"a disk needs at least one {BLOCK_SIZE}-byte block")
        self.store = store
        self.identity = identity or Identity()
        self.read_only = read_only
        self.blocks = store.size // BLOCK_SIZE
        self.sense: Sense = NO_SENSE
        self.commands: dict[int, int] = {}
        """Count of each operation code seen (unknown ones too)."""

    @staticmethod
    def is_data_out(cdb: bytes) -> bool:
        return bool(cdb) and cdb[0] in DATA_OUT

    @staticmethod
    def data_out_length(cdb: bytes) -> int | None:
        """Bytes of data a data-out command expects, from its CDB (None: not data-out/unknown)."""
        op = cdb[0] if cdb else -1
        try:
            if op == Op.WRITE_10:
                return int(CDB10.unpack_from(cdb)[4]) * BLOCK_SIZE
            if op == Op.WRITE_16:
                return int(CDB16.unpack_from(cdb)[3]) * BLOCK_SIZE
            if op == Op.WRITE_6:
                return (cdb[4] or 256) * BLOCK_SIZE
            if op == Op.MODE_SELECT_6:
                return cdb[4]
        except (struct.error, IndexError):
            return None
        return None

    def execute(self, cdb: bytes, data_out: bytes = b"") -> ScsiReply:
        """Run one command; REQUEST SENSE answers from the sense this sets on failures."""
        op = cdb[0] if cdb else -1
        self.commands[op] = self.commands.get(op, 0) + 1
        try:
            reply = self._dispatch(op, cdb, data_out)
        except (struct.error, IndexError):
            reply = ScsiReply(CHECK_CONDITION, sense=INVALID_FIELD_IN_CDB)
        if op != Op.REQUEST_SENSE:
            self.sense = reply.sense
        return reply

    def _dispatch(self, op: int, cdb: bytes, data_out: bytes) -> ScsiReply:
        match op:
            case Op.TEST_UNIT_READY | Op.PREVENT_ALLOW_MEDIUM_REMOVAL | Op.START_STOP_UNIT:
                return ScsiReply(GOOD)
            case Op.VERIFY_10 | Op.MODE_SELECT_6:
                return ScsiReply(GOOD)
            case Op.REQUEST_SENSE:
                return self._request_sense(cdb)
            case Op.INQUIRY:
                return self._inquiry(cdb)
            case Op.MODE_SENSE_6 | Op.MODE_SENSE_10:
                return self._mode_sense(cdb, ten=op == Op.MODE_SENSE_10)
            case Op.READ_CAPACITY_10:
                last = min(self.blocks - 1, 0xFFFFFFFF)
                return ScsiReply(GOOD, CAPACITY_10.pack(last, BLOCK_SIZE))
            case Op.SERVICE_ACTION_IN_16 if cdb[1] & 0x1F == 0x10:
                alloc = int.from_bytes(cdb[10:14], "big")
                return ScsiReply(GOOD, CAPACITY_16.pack(self.blocks - 1, BLOCK_SIZE)[:alloc])
            case Op.SYNCHRONIZE_CACHE_10 | Op.SYNCHRONIZE_CACHE_16:
                try:
                    self.store.flush()
                except OSError:
                    return ScsiReply(CHECK_CONDITION, sense=WRITE_ERROR)
                return ScsiReply(GOOD)
            case Op.READ_6 | Op.READ_10 | Op.READ_16:
                return self._read(*_lba_and_count(op, cdb))
            case Op.WRITE_6 | Op.WRITE_10 | Op.WRITE_16:
                return self._write(*_lba_and_count(op, cdb), data_out)
            case _:
                return ScsiReply(CHECK_CONDITION, sense=INVALID_OPCODE)

    def _request_sense(self, cdb: bytes) -> ScsiReply:
        key, asc, ascq = self.sense
        # Fixed format sense data (SPC-4 4.5.3): current error, additional length 10.
        data = struct.pack(">BBBIB4xBB4x", 0x70, 0, key, 0, 10, asc, ascq)
        self.sense = NO_SENSE
        return ScsiReply(GOOD, data[: cdb[4]])

    def _inquiry(self, cdb: bytes) -> ScsiReply:
        alloc = int.from_bytes(cdb[3:5], "big")
        ident = self.identity
        if cdb[1] & 0x01:  # EVPD: vital product data
            page = cdb[2]
            if page == 0x00:
                data = bytes([0, 0x00, 0, 2, 0x00, 0x80])
            elif page == 0x80:
                serial = ident.serial.encode("ascii", "replace")
                data = bytes([0, 0x80, 0, len(serial)]) + serial
            else:
                return ScsiReply(CHECK_CONDITION, sense=INVALID_FIELD_IN_CDB)
            return ScsiReply(GOOD, data[:alloc])
        if cdb[2]:
            return ScsiReply(CHECK_CONDITION, sense=INVALID_FIELD_IN_CDB)
        # Direct-access device, removable (RMB), SPC-2, response format 2, 31 more bytes.
        data = bytes([0x00, 0x80, 0x04, 0x02, 31, 0, 0, 0])
        data += _ascii(ident.vendor, 8) + _ascii(ident.product, 16) + _ascii(ident.revision, 4)
        return ScsiReply(GOOD, data[:alloc])

    def _mode_sense(self, cdb: bytes, *, ten: bool) -> ScsiReply:
        page = cdb[2] & 0x3F
        alloc = int.from_bytes(cdb[7:9], "big") if ten else cdb[4]
        if page not in (0x08, 0x3F):
            return ScsiReply(CHECK_CONDITION, sense=INVALID_FIELD_IN_CDB)
        # Caching mode page (SBC-3 6.4.5): write cache disabled, read cache enabled.
        caching = bytes([0x08, 0x12]) + bytes(18)
        wp = 0x80 if self.read_only else 0x00
        if ten:
            head = struct.pack(">HBBxxH", 6 + len(caching), 0, wp, 0)
        else:
            head = bytes([3 + len(caching), 0, wp, 0])
        return ScsiReply(GOOD, (head + caching)[:alloc])

    def _check_range(self, lba: int, count: int) -> ScsiReply | None:
        if count > MAX_TRANSFER_BLOCKS:
            return ScsiReply(CHECK_CONDITION, sense=INVALID_FIELD_IN_CDB)
        if lba + count > self.blocks:
            return ScsiReply(CHECK_CONDITION, sense=LBA_OUT_OF_RANGE)
        return None

    def _read(self, lba: int, count: int) -> ScsiReply:
        if (bad := self._check_range(lba, count)) is not None:
            return bad
        try:
            return ScsiReply(GOOD, self.store.read(lba * BLOCK_SIZE, count * BLOCK_SIZE))
        except OSError:
            return ScsiReply(CHECK_CONDITION, sense=UNRECOVERED_READ_ERROR)

    def _write(self, lba: int, count: int, data: bytes) -> ScsiReply:
        if (bad := self._check_range(lba, count)) is not None:
            return bad
        if self.read_only:
            return ScsiReply(CHECK_CONDITION, sense=(0x7, 0x27, 0x00))  # DATA PROTECT
        if len(data) != count * BLOCK_SIZE:
            return ScsiReply(CHECK_CONDITION, sense=PARAMETER_LIST_LENGTH)
        try:
            self.store.write(lba * BLOCK_SIZE, data)
        except OSError:
            return ScsiReply(CHECK_CONDITION, sense=WRITE_ERROR)
        return ScsiReply(GOOD)


def _lba_and_count(op: int, cdb: bytes) -> tuple[int, int]:
    if op in (Op.READ_10, Op.WRITE_10):
        _, _, lba, _, count, _ = CDB10.unpack_from(cdb)
        return lba, count
    if op in (Op.READ_16, Op.WRITE_16):
        _, _, lba, count, _, _ = CDB16.unpack_from(cdb)
        return lba, count
    lba = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF
    return lba, cdb[4] or 256


def _ascii(text: str, width: int) -> bytes:
    return text.encode("ascii", "replace")[:width].ljust(width, b" ")
