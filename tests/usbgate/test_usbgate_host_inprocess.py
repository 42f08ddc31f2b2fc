"""usbgate.host.Host in-process, on in-memory rules: what the shared watcher hands each VM."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from usbgate.addresses import parse_address
from usbgate.gateway import Gateway
from usbgate.host import Host, HostError, VmSpec
from usbgate.rules.policy import Rule, parse_rule
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


def test_the_control_group_may_use_the_socket_and_no_one_else(tmp_path: Path) -> None:
    """SO_PEERCRED against --control-group: a member by a supplementary group is let in, the
    same user without it is refused (even when the socket file lets it connect)."""
    import grp
    import json
    import subprocess
    import sys

    from scripts.lab.qmp import short_tmpdir
    from usbgate.host import ControlServer

    if os.geteuid() != 0:
        pytest.skip("needs root to run the client as another user")
    gid = grp.getgrnam("users").gr_gid  # not nobody's own group
    work = short_tmpdir()
    work.chmod(0o711)
    control = work / "usbgate.ctl"
    usbgate = str(Path(sys.executable).with_name("usbgate"))
    host = Host(MemoryRuleSource({"a": []}), MemoryAuditSink())
    server = ControlServer(host, control, group=gid)

    def as_nobody(*groups: str) -> subprocess.CompletedProcess[str]:
        who = ["setpriv", "--reuid=65534", "--regid=65534", *groups]
        argv = [*who, usbgate, "host", "list", "--json", "--control", str(control)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    async def scenario() -> list[subprocess.CompletedProcess[str]]:
        await host.start([_spec(work, "a")])
        await server.start()
        try:
            assert control.stat().st_gid == gid and control.stat().st_mode & 0o777 == 0o660
            member = await asyncio.to_thread(as_nobody, f"--groups={gid}")
            control.chmod(0o666)  # past the file mode: SO_PEERCRED must refuse a stranger
            return [member, await asyncio.to_thread(as_nobody, "--clear-groups")]
        finally:
            await server.stop()
            await host.stop()

    try:
        member, stranger = asyncio.run(scenario())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert member.returncode == 0, member.stderr
    assert [v["vm"] for v in json.loads(member.stdout)["vms"]] == ["a"]
    assert stranger.returncode != 0 and "uid 65534 may not control" in stranger.stderr


def test_vms_added_over_the_socket_are_served_again_after_a_restart(tmp_path: Path) -> None:
    from usbgate.host import ControlServer, control_request

    state, control = tmp_path / "host.json", tmp_path / "usbgate.ctl"
    rules = {"a": [], "b": []}

    async def run(requests: list[dict[str, object]]) -> list[str]:
        host = Host(MemoryRuleSource(rules), MemoryAuditSink())
        server = ControlServer(host, control, state=state)
        await host.start()
        errors = await server.restore()
        await server.start()
        try:
            for request in requests:
                await asyncio.to_thread(control_request, control, request)
            return sorted(host.gateways) + errors
        finally:
            await server.stop()
            await host.stop()

    a, b = _spec(tmp_path, "a").to_json(), _spec(tmp_path, "b").to_json()
    assert asyncio.run(run([{"op": "add", **a}, {"op": "add", **b}, {"op": "add", **a},
                            {"op": "remove", "vm": "b"}])) == ["a"]  # fmt: skip
    assert state.stat().st_mode & 0o777 == 0o600
    assert asyncio.run(run([])) == ["a"]  # served again after the restart
    state.write_text("{not json")  # a damaged file: one line, the host still starts
    [error] = asyncio.run(run([]))
    assert error.startswith(f"{state}: unreadable, starting without it")


def test_adding_a_vm_whose_rules_are_slow_to_read_holds_up_no_other_vm(tmp_path: Path) -> None:
    """A PostgreSQL source takes up to its listener's wake interval (seconds while the
    database is away) to LISTEN for a new VM: the event loop of every VM must go on."""
    import time

    class SlowSource(MemoryRuleSource):
        def load(self, vm: str) -> list[Rule]:
            if vm == "slow":
                time.sleep(0.5)  # a round trip to a remote store
            return super().load(vm)

        async def aload(self, vm: str) -> list[Rule]:
            return await asyncio.to_thread(self.load, vm)

    source = SlowSource({"a": [parse_rule("allow id 0781:5567")], "slow": []})
    host = Host(source, MemoryAuditSink())

    async def scenario() -> float:
        await host.start([_spec(tmp_path, "a")])
        try:
            adding = asyncio.create_task(host.add(_spec(tmp_path, "slow")))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            source.set("a", [parse_rule("block id 0781:5567")])
            await asyncio.sleep(0.02)  # the watcher's ticks run meanwhile
            held = time.monotonic() - started
            assert not adding.done() and host.gateways["a"].rules[0].action.value == "block"
            await adding
            return held
        finally:
            await host.stop()

    assert asyncio.run(scenario()) < 0.3


def test_a_rule_source_that_breaks_denies_every_vm_and_the_watching_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allow = [parse_rule("allow id 0781:5567")]
    source = MemoryRuleSource({"a": allow, "b": allow})
    audit = MemoryAuditSink()
    host = Host(source, audit, poll_interval=0.005)

    def broken(vms: object) -> dict[str, object]:
        raise OSError("the store went away")

    async def scenario() -> None:
        await host.start([_spec(tmp_path, "a"), _spec(tmp_path, "b")])
        try:
            with monkeypatch.context() as m:
                m.setattr(source, "poll_many", broken)
                await asyncio.sleep(0.05)  # several ticks, each failing
                assert [g.rules for g in host.gateways.values()] == [[], []]
            source.set("b", allow)
            await asyncio.sleep(0.05)  # the watcher survived: b's rules come back
            assert host.gateways["b"].rules == allow and host.gateways["a"].rules == []
        finally:
            await host.stop()

    asyncio.run(scenario())
    assert sorted(vm for a, vm, _ in audit.rows if a == "usb.rules.unreadable") == ["a", "b"]
