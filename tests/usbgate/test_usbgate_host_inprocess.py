"""usbgate.host.Host in-process, on in-memory rules: what the shared watcher hands each VM."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from usbgate.addresses import parse_address
from usbgate.gateway import Gateway
from usbgate.host import Host, HostError, VmSpec
from usbgate.policy import parse_rule
from usbgate.sources import MemoryAuditSink, MemoryRuleSource


def _spec(tmp: Path, vm: str) -> VmSpec:
    return VmSpec(vm, parse_address(f"unix:{tmp}/{vm}.sock"),
                  (parse_address(f"unix:{tmp}/{vm}-q.sock"),))  # fmt: skip


def test_each_change_reaches_its_vm_only_and_a_failing_vm_stops_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allow = [parse_rule("allow id 0781:5567")]
    source = MemoryRuleSource({"a": allow, "b": allow, "c": allow})
    audit = MemoryAuditSink()
    host = Host(source, audit)
    applied: list[str] = []
    real_apply = Gateway.apply

    def apply(self: Gateway, new: object, seen: float) -> None:
        applied.append(self.vm)
        if self.vm == "a":
            raise RuntimeError("a bug in vm a")
        real_apply(self, new, seen)  # type: ignore[arg-type]

    monkeypatch.setattr(Gateway, "apply", apply)

    async def scenario() -> None:
        await host.start([_spec(tmp_path, vm) for vm in ("a", "b", "c")])
        try:
            block = [parse_rule("block id 0781:5567")]
            source.set("a", block)
            source.set("b", block)
            host.tick()
            assert sorted(applied) == ["a", "b"]  # c's rules did not change: not touched
            assert host.gateways["b"].rules == block and host.gateways["c"].rules == allow
            with pytest.raises(HostError, match="already used by VM b"):
                await host.add(VmSpec("d", parse_address(f"unix:{tmp_path}/b.sock"),
                                      (parse_address(f"unix:{tmp_path}/d-q.sock"),)))  # fmt: skip
            await host.remove("c")
            assert not (tmp_path / "c.sock").exists() and sorted(host.gateways) == ["a", "b"]
        finally:
            await host.stop()

    asyncio.run(scenario())
    assert [(a, vm) for a, vm, _ in audit.rows] == [
        ("usb.host.added", "a"), ("usb.host.added", "b"), ("usb.host.added", "c"),
        ("usb.host.removed", "c"), ("usb.host.removed", "a"), ("usb.host.removed", "b"),
    ]  # fmt: skip
