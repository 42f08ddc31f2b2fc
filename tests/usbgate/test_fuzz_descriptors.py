"""Fuzzing the USB descriptor parsers and the probe that reads them from a hostile device.

Seeds are the descriptors of simulated devices (storage, keyboard, composite, vendor); each
case mutates one and hands it to every parser, or answers the whole probe with mutated
descriptors. The only exceptions allowed are the project's own: DescriptorError from the
parsers, ProbeFailed / Contradiction from the probe. Long run:
``VMSHIELD_FUZZ_CASES=1000000 .venv/bin/python -m pytest tests/usbgate/test_fuzz_descriptors.py``.
"""

from __future__ import annotations

import random

from tests.support.fuzzing import cases, mutate, pick, where
from usbgate.probe import Contradiction, ProbeFailed, probe_steps, reconcile
from usbgate.simulator import HID_KEYBOARD, MASS_STORAGE, VENDOR, FakeDevice
from usbgate.usbredir.descriptors import (
    ConfigDescriptor,
    DescriptorError,
    DeviceDescriptor,
    interface_triples_in,
    parse_langids,
    parse_string,
)

DEVICES = [
    FakeDevice(),
    FakeDevice(interfaces=(HID_KEYBOARD,), serial=None),
    FakeDevice(interfaces=(MASS_STORAGE, HID_KEYBOARD, VENDOR)),
    FakeDevice(0x1234, 0xABCD, device_class=0xEF, serial="S" * 40),
]
SEEDS = [
    blob
    for d in DEVICES
    for blob in (d.device_descriptor(), d.config_descriptor(), d.string_descriptor(0) or b"",
                 d.string_descriptor(3) or b"\x02\x03")
]  # fmt: skip
PARSERS = (DeviceDescriptor.parse, ConfigDescriptor.total_length_of, ConfigDescriptor.parse,
           parse_string, parse_langids, interface_triples_in)  # fmt: skip


def test_fuzz_descriptor_parsers() -> None:
    parsed = refused = 0
    for n, rng in cases(8_000, salt=3):
        data = mutate(rng, pick(rng, SEEDS)) if rng.random() < 0.9 else rng.randbytes(40)
        for parse in PARSERS:
            try:
                parse(data)
                parsed += 1
            except DescriptorError:
                refused += 1
            except Exception as exc:
                raise AssertionError(f"{where(n)}: {parse.__qualname__}({data!r}): "
                                     f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    print(f"\ndescriptor fuzz: {n + 1} cases, {parsed} parses, {refused} DescriptorErrors")
    assert parsed and refused


def hostile_answers(rng: random.Random, device: FakeDevice, request: tuple[int, int, int]) -> bytes:
    value, _, length = request
    honest = device.descriptor(value) or b""
    return mutate(rng, honest[:length]) if rng.random() < 0.3 else honest[:length]


def test_fuzz_the_probe_with_a_hostile_device() -> None:
    outcomes = {"judged": 0, "failed": 0, "contradiction": 0}
    for n, rng in cases(4_000, salt=4):
        device = rng.choice(DEVICES)
        steps = probe_steps()
        try:
            request = next(steps)
            while True:
                request = steps.send(hostile_answers(rng, device, request))
        except StopIteration as done:
            result = done.value
        except ProbeFailed:
            outcomes["failed"] += 1
            continue
        except Exception as exc:
            raise AssertionError(f"{where(n)}: probe raised {type(exc).__name__}: {exc}") from exc
        try:
            judged = reconcile(device.device_connect(), device.interface_info(), result,
                               bcd_announced=True)  # fmt: skip
        except Contradiction:
            outcomes["contradiction"] += 1
            continue
        # what is judged is what the descriptors (the probe's raw bytes) describe
        raw = set()
        for blob in result.raw.values():
            raw |= set(interface_triples_in(blob)) if blob[1:2] == b"\x02" else set()
        assert set(judged.interfaces) == raw, where(n)
        outcomes["judged"] += 1
    print(f"\nprobe fuzz: {n + 1} cases, {outcomes}")
    assert all(outcomes.values())
