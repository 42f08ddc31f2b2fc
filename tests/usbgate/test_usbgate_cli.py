"""The `usbgate` command line (click CliRunner) and the rule sources it can use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from usbgate import devices as devices_module
from usbgate.addresses import parse_address
from usbgate.cli import main


def test_help_documents_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "devices", "qemu-filter"):
        assert command in result.output
    run_help = CliRunner().invoke(main, ["run", "--help"]).output
    for words in ("--listen", "--qemu", "usbredirect", "PRAGMA data_version", "Example"):
        assert words in run_help
    assert "host" in result.output
    serve_help = CliRunner().invoke(main, ["host", "serve", "--help"]).output
    for words in ("--vm NAME=LISTEN,QEMU", "--vm-dir", "SIGHUP", "SO_PEERCRED", "Example",
                  "--poll-ms", "--max-per-peer"):  # fmt: skip
        assert words in serve_help
    for command in ("add", "remove", "list"):
        assert "--control" in CliRunner().invoke(main, ["host", command, "--help"]).output


def test_host_vm_specs_and_directory(tmp_path: Path) -> None:
    from usbgate.host import HostError, VmSpec, read_vm_dir

    spec = VmSpec.parse("web1=tcp:0.0.0.0:4000,unix:/run/a.sock,unix:/run/b.sock")
    assert spec.to_json() == {"vm": "web1", "listen": "tcp:0.0.0.0:4000",
                              "qemu": ["unix:/run/a.sock", "unix:/run/b.sock"]}  # fmt: skip
    for bad in ("web1", "web1=tcp:0.0.0.0:4000", "=tcp:h:1,unix:/q", "w=ftp:x,unix:/q"):
        with pytest.raises(ValueError):
            VmSpec.parse(bad)
    (tmp_path / "web1.conf").write_text(
        "# usbgate@web1\nUSBGATE_LISTEN=tcp:0.0.0.0:4000\n"
        "USBGATE_QEMU='unix:/run/a.sock unix:/run/b.sock'  # two slots\n"
    )
    (tmp_path / "web2.conf").write_text("USBGATE_LISTEN=tcp:0.0.0.0:4001\n")
    (tmp_path / "README").write_text("not a VM\n")
    specs, errors = read_vm_dir(tmp_path)
    assert specs == {"web1": spec} and list(errors) == ["web2"]
    assert "USBGATE_QEMU" in errors["web2"]
    with pytest.raises(HostError, match="not a directory"):
        read_vm_dir(tmp_path / "nothing")


def test_devices_without_a_usb_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(devices_module.list_devices, "__defaults__", (tmp_path / "nothing",))
    result = CliRunner().invoke(main, ["devices"])
    assert result.exit_code == 0
    assert "no USB stack" in result.output
    as_json = json.loads(CliRunner().invoke(main, ["devices", "--json"]).output)
    assert as_json["devices"] == [] and "no USB stack" in as_json["error"]


@pytest.mark.skipif(not Path("/sys/bus/usb").exists(), reason="this host has no USB stack")
def test_devices_lists_local_devices() -> None:  # pragma: no cover - needs a USB host
    result = CliRunner().invoke(main, ["devices", "--json"])
    assert result.exit_code == 0
    assert "devices" in json.loads(result.output)


def test_qemu_filter_from_a_rules_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.write_text("allow id 0781:5567 with-interface 08:*:*\nblock id *:*\n")
    result = CliRunner().invoke(main, ["qemu-filter", "vm1", "--rules-file", str(rules)])
    assert result.exit_code == 0, result.output
    assert "filter=-1:0x0781:0x5567:-1:1|-1:-1:-1:-1:0" in result.output
    assert "<redirfilter>" in result.output
    args = ["qemu-filter", "vm1", "--rules-file", str(rules), "--json"]
    out = json.loads(CliRunner().invoke(main, args).output)
    assert out["usbredir_filter"] == "-1,0x0781,0x5567,-1,1|-1,-1,-1,-1,0"


def test_qemu_filter_from_the_keystore(tmp_path: Path) -> None:
    import asyncio

    from argon2 import PasswordHasher

    from keystore.auth import AuthPolicy
    from keystore.models import UsbAction
    from keystore.sqlite.connection import initialise
    from keystore.sqlite.repository import SqliteRepository

    db = tmp_path / "k.db"
    initialise(db)
    fast = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))

    async def setup() -> None:
        repo = await SqliteRepository.open(db, policy=fast)
        await repo.add_principal("alice", b"pw", actor="t")
        await repo.add_vm("web1", "alice", actor="t")
        await repo.add_usb_rule("web1", UsbAction.ALLOW, 0x046D, None, actor="t")
        await repo.close()

    asyncio.run(setup())
    result = CliRunner().invoke(main, ["qemu-filter", "web1", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "filter=-1:0x046d:-1:-1:1|-1:-1:-1:-1:0" in result.output
    missing = CliRunner().invoke(main, ["qemu-filter", "nosuchvm", "--db", str(db)])
    assert missing.exit_code != 0 and "nosuchvm" in missing.output
    # `vmshield usb qemu-filter` is the same translation, in its own (unchanged) shapes
    from keystore.cli import main as vmshield

    ours = json.loads(CliRunner().invoke(main, ["qemu-filter", "web1", "--db", str(db),
                                                "--json"]).output)  # fmt: skip
    theirs = CliRunner().invoke(vmshield, ["usb", "qemu-filter", "web1", "--db", str(db),
                                           "--json"])  # fmt: skip
    assert theirs.exit_code == 0, theirs.output
    other = json.loads(theirs.output)
    assert sorted(other) == ["filter", "libvirt_xml", "notes", "qemu_device", "vm"]
    assert other["filter"] == ours["qemu_filter"]
    assert other["libvirt_xml"] == ours["libvirt_redirfilter"]
    assert other["qemu_device"] == f"-device usb-redir,chardev=usbredir0,filter={other['filter']}"
    text = CliRunner().invoke(vmshield, ["usb", "qemu-filter", "web1", "--db", str(db)]).output
    assert text.startswith("QEMU:\n  '-device usb-redir,chardev=usbredir0,filter=-1:0x046d:")


def test_run_rejects_bad_addresses_and_sources(tmp_path: Path) -> None:
    bad = CliRunner().invoke(main, ["run", "--vm", "v", "--listen", "udp:1", "--qemu", "unix:x"])
    assert bad.exit_code == 2 and "unknown address kind" in bad.output
    base = ["run", "--vm", "v", "--listen", "tcp:127.0.0.1:0", "--qemu", "unix:x"]
    both = CliRunner().invoke(main, [*base, "--db", "a", "--rules-file", "b"])
    assert both.exit_code == 2 and "not both" in both.output
    unreadable = CliRunner().invoke(main, [*base, "--rules-file", str(tmp_path / "missing")])
    assert unreadable.exit_code == 1 and "cannot read rules file" in unreadable.output


def test_addresses() -> None:
    assert str(parse_address("tcp:127.0.0.1:4000")) == "tcp:127.0.0.1:4000"
    assert parse_address("tcp:[::1]:4000").host == "::1"
    assert parse_address("unix:/run/x.sock").path == "/run/x.sock"
    for bad in ("tcp:host", "tcp:h:99999", "unix:", "unix:/" + "x" * 200, "serial:/dev/ttyS0"):
        with pytest.raises(ValueError):
            parse_address(bad)
