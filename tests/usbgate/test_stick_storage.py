"""The simulated stick's firmware alone: SCSI commands over the Bulk-Only Transport, sans-IO."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from usbgate.cli import main as usbgate_main
from usbgate.simulator import BULK_IN, BULK_OUT, MassStorageStick
from usbgate.storage import BulkOnlyTransport, FileStore, MemoryStore, ScsiDisk, Transfer
from usbgate.storage.bot import CBW, CBW_SIGNATURE, CSW, CSW_SIGNATURE, CswStatus, Stage
from usbgate.usbredir.packets import BulkPacket, ControlPacket, Reset
from usbgate.usbredir.wire import Status

SIZE = 1024 * 1024  # 2048 blocks


def cbw(tag: int, length: int, cdb: bytes, *, data_in: bool) -> bytes:
    return CBW.pack(CBW_SIGNATURE, tag, length, 0x80 if data_in else 0, 0, len(cdb),
                    cdb.ljust(16, b"\0"))  # fmt: skip


def csw(bot: BulkOnlyTransport) -> tuple[int, int, int]:
    outcome, data = bot.bulk_in(CSW.size)
    assert outcome is Transfer.OK
    signature, tag, residue, status = CSW.unpack(data)
    assert signature == CSW_SIGNATURE
    return tag, residue, status


def command_in(bot: BulkOnlyTransport, cdb: bytes, length: int, tag: int = 7) -> bytes:
    assert bot.bulk_out(cbw(tag, length, cdb, data_in=True)) is Transfer.OK
    outcome, data = bot.bulk_in(length)
    assert outcome is Transfer.OK
    assert csw(bot) == (tag, length - len(data), CswStatus.PASSED)
    return data


def read10(lba: int, count: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, count, 0)


def write10(lba: int, count: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, count, 0)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(SIZE)


@pytest.fixture
def bot(store: MemoryStore) -> BulkOnlyTransport:
    return BulkOnlyTransport(ScsiDisk(store))


def test_inquiry_and_capacity(bot: BulkOnlyTransport) -> None:
    inquiry = command_in(bot, bytes([0x12, 0, 0, 0, 36, 0]), 36)
    assert len(inquiry) == 36 and inquiry[0] == 0 and inquiry[1] & 0x80  # disk, removable
    assert inquiry[8:16] == b"vmshield"
    cap10 = command_in(bot, bytes([0x25]) + bytes(9), 8)
    assert struct.unpack(">II", cap10) == (SIZE // 512 - 1, 512)
    cap16 = command_in(bot, bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2), 32)
    assert struct.unpack_from(">QI", cap16) == (SIZE // 512 - 1, 512)
    sense = command_in(bot, bytes([0x1A, 0, 0x3F, 0, 192, 0]), 192)
    assert sense[0] == len(sense) - 1 and sense[2] & 0x80 == 0  # not write protected


def test_write_then_read_in_pieces(bot: BulkOnlyTransport, store: MemoryStore) -> None:
    payload = os.urandom(8 * 512)
    assert bot.bulk_out(cbw(1, len(payload), write10(100, 8), data_in=False)) is Transfer.OK
    for off in range(0, len(payload), 1536):  # the data phase may come in several transfers
        assert bot.bulk_out(payload[off : off + 1536]) is Transfer.OK
    assert csw(bot) == (1, 0, CswStatus.PASSED)
    assert store.buf[100 * 512 : 108 * 512] == payload
    assert bot.bulk_out(cbw(2, len(payload), read10(100, 8), data_in=True)) is Transfer.OK
    got = b""
    while bot.stage is Stage.DATA_IN:
        outcome, chunk = bot.bulk_in(1000)
        assert outcome is Transfer.OK
        got += chunk
    assert got == payload
    assert csw(bot) == (2, 0, CswStatus.PASSED)
    assert bot.bulk_out(cbw(3, 0, bytes([0x35]) + bytes(9), data_in=False)) is Transfer.OK
    assert csw(bot) == (3, 0, CswStatus.PASSED) and store.flushes == 1


def test_unknown_command_fails_with_illegal_request_and_stalls(bot: BulkOnlyTransport) -> None:
    assert bot.bulk_out(cbw(9, 252, bytes([0x23]) + bytes(9), data_in=True)) is Transfer.OK
    assert bot.bulk_in(252) == (Transfer.STALL, b"")  # no data: bulk-in halts
    assert bot.bulk_in(13) == (Transfer.STALL, b"")  # until the host clears the halt
    bot.clear_halt(endpoint_in=True)
    assert csw(bot) == (9, 252, CswStatus.FAILED)
    sense = command_in(bot, bytes([0x03, 0, 0, 0, 18, 0]), 18)
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (0x5, 0x20, 0x00)  # invalid opcode
    again = command_in(bot, bytes([0x03, 0, 0, 0, 18, 0]), 18)
    assert again[2] & 0x0F == 0  # REQUEST SENSE cleared it


def test_read_past_the_end_is_lba_out_of_range(bot: BulkOnlyTransport) -> None:
    assert bot.bulk_out(cbw(4, 1024, read10(SIZE // 512 - 1, 2), data_in=True)) is Transfer.OK
    assert bot.bulk_in(1024)[0] is Transfer.STALL
    bot.clear_halt(endpoint_in=True)
    assert csw(bot)[2] == CswStatus.FAILED
    sense = command_in(bot, bytes([0x03, 0, 0, 0, 18, 0]), 18)
    assert (sense[2] & 0x0F, sense[12]) == (0x5, 0x21)


def test_invalid_cbw_needs_a_reset(bot: BulkOnlyTransport) -> None:
    assert bot.bulk_out(b"USBC" + bytes(20)) is Transfer.STALL
    bot.clear_halt(endpoint_in=True)
    bot.clear_halt(endpoint_in=False)
    assert bot.bulk_out(cbw(5, 0, bytes(6), data_in=False)) is Transfer.STALL  # still out of step
    bot.reset()
    bot.clear_halt(endpoint_in=False)
    assert bot.bulk_out(cbw(6, 0, bytes(6), data_in=False)) is Transfer.OK  # TEST UNIT READY
    assert csw(bot) == (6, 0, CswStatus.PASSED)


def test_short_answer_reports_the_residue(bot: BulkOnlyTransport) -> None:
    assert bot.bulk_out(cbw(8, 255, bytes([0x12, 0, 0, 0, 255, 0]), data_in=True)) is Transfer.OK
    outcome, data = bot.bulk_in(255)
    assert outcome is Transfer.OK and len(data) == 36
    assert csw(bot) == (8, 255 - 36, CswStatus.PASSED)


def test_file_store_and_the_stick_over_usbredir_packets(tmp_path: Path) -> None:
    image = tmp_path / "stick.img"
    image.write_bytes(bytes(SIZE))
    stick = MassStorageStick.from_image(str(image))
    payload = b"\xa5" * 512

    def bulk(packet: BulkPacket) -> BulkPacket:
        (reply,) = stick.handle(packet) or []
        assert isinstance(reply, BulkPacket) and reply.id == packet.id
        return reply

    out = cbw(1, 512, write10(3, 1), data_in=False)
    assert bulk(BulkPacket(BULK_OUT, 0, len(out), data=out, id=1)).status == Status.SUCCESS
    assert bulk(BulkPacket(BULK_OUT, 0, 512, data=payload, id=2)).length == 512
    reply = bulk(BulkPacket(BULK_IN, 0, 13, id=3))
    assert reply.status == Status.SUCCESS and CSW.unpack(reply.data)[3] == CswStatus.PASSED
    assert image.read_bytes()[3 * 512 : 4 * 512] == payload
    # A data-in command without data stalls; CLEAR_FEATURE(ENDPOINT_HALT) on 0x81 clears it.
    bad = cbw(2, 64, bytes([0xFF]) + bytes(5), data_in=True)
    bulk(BulkPacket(BULK_OUT, 0, len(bad), data=bad, id=4))
    assert bulk(BulkPacket(BULK_IN, 0, 64, id=5)).status == Status.STALL
    clear = ControlPacket(0, 0x01, 0x02, 0, 0, BULK_IN, 0, id=6)
    (ack,) = stick.handle(clear) or []
    assert isinstance(ack, ControlPacket) and ack.status == Status.SUCCESS
    assert CSW.unpack(bulk(BulkPacket(BULK_IN, 0, 13, id=7)).data)[3] == CswStatus.FAILED
    lun = ControlPacket(0x80, 0xFE, 0xA1, 0, 0, 0, 1, id=8)
    assert (stick.handle(lun) or [None])[0] == ControlPacket(0x80, 0xFE, 0xA1, 0, 0, 0, 1, b"\0",
                                                              id=8)  # fmt: skip
    assert stick.handle(Reset()) == []
    assert isinstance(stick.transport, BulkOnlyTransport)
    store = stick.transport.disk.store
    assert isinstance(store, FileStore)
    store.close()


def test_simulate_stick_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(usbgate_main, ["simulate-stick", str(tmp_path / "none.img"),
                                           "--connect", "tcp:127.0.0.1:1"])  # fmt: skip
    assert missing.exit_code == 1 and "No such file" in missing.output
    assert "Traceback" not in missing.output
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    small = runner.invoke(usbgate_main, ["simulate-stick", str(tiny), "--connect",
                                         "tcp:127.0.0.1:1"])  # fmt: skip
    assert small.exit_code == 1 and "at least one 512-byte block" in small.output
    vid = runner.invoke(usbgate_main, ["simulate-stick", str(tiny), "--vid", "12345",
                                       "--connect", "tcp:127.0.0.1:1"])  # fmt: skip
    assert vid.exit_code == 2 and "4-digit hex" in vid.output


def test_a_guest_cannot_make_the_stick_hold_its_image_in_memory() -> None:
    """READ(10) of 65535 blocks made the stick read 32 MiB into memory at once (READ(16):
    the whole image), and a WRITE's data-out was kept up to the 4 GiB the CBW announced: a
    malicious guest sized the owner's process. One command moves at most 16 MiB."""
    big = BulkOnlyTransport(ScsiDisk(MemoryStore(40 * 1024 * 1024)))
    length = 65535 * 512
    assert big.bulk_out(cbw(5, length, read10(0, 65535), data_in=True)) is Transfer.OK
    assert big.bulk_in(length)[0] is Transfer.STALL
    big.clear_halt(endpoint_in=True)
    assert csw(big)[2] == CswStatus.FAILED
    sense = command_in(big, bytes([0x03, 0, 0, 0, 18, 0]), 18)
    assert (sense[2] & 0x0F, sense[12]) == (0x5, 0x24)  # ILLEGAL REQUEST, INVALID FIELD IN CDB
    from usbgate.storage.scsi import MAX_TRANSFER

    assert big.bulk_out(cbw(6, 0xFFFFFFFF, write10(0, 65535), data_in=False)) is Transfer.OK
    chunk = bytes(1024 * 1024)
    for _ in range(20):
        assert big.bulk_out(chunk) is Transfer.OK
    assert big._cmd is not None and len(big._cmd.data) <= MAX_TRANSFER
