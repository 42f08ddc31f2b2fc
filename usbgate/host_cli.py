"""`usbgate host ...`: one usbgate process for every VM of the host (usbgate.host).

`usbgate host serve` runs it; `usbgate host add/remove/list` talk to it over its control
socket, as the libvirt hook or an admin would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Any

import click

from usbgate.addresses import Address
from usbgate.auditing import MAX_QUEUED_PER_VM
from usbgate.cli import (
    _audit_sink,
    _fail,
    _rule_source,
    gateway_options,
    listen_option,
    qemu_option,
    rules_options,
)
from usbgate.errors import RuleSourceError
from usbgate.host import (
    DEFAULT_CONTROL,
    ControlServer,
    Host,
    HostError,
    VmSpec,
    control_request,
    group_id,
    read_vm_dir,
)
from usbgate.sources import AuditSink


def _specs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[VmSpec]:
    try:
        return [VmSpec.parse(v) for v in value]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def control_option(f: Any) -> Any:
    return click.option(
        "--control",
        type=click.Path(dir_okay=False, readable=False, path_type=Path),
        default=DEFAULT_CONTROL,
        show_default=True,
        envvar="USBGATE_CONTROL",
        show_envvar=True,
        help="The host's control socket (a unix socket path).",
    )(f)


@click.group("host")
def host() -> None:
    """One usbgate for every VM of this host (instead of one `usbgate run` per VM).

    `usbgate host serve` relays the usbredir sockets of many VMs in one process, each VM with
    its own listening address, usb-redir slots and sessions as under `usbgate run`, over ONE
    keystore connection (on PostgreSQL one LISTEN for all VMs; a rule change of one VM reaches
    that VM's sessions only). VMs are given with --vm at start and added or removed while it
    runs with `usbgate host add/remove`, over its control socket.
    """


@host.command("serve")
@click.option(
    "--vm",
    "vms",
    multiple=True,
    callback=_specs,
    metavar="NAME=LISTEN,QEMU[,QEMU...]",
    help="A VM to serve from the start: its name in the keystore, where its owners connect "
    "(as `run --listen`) and its usb-redir chardevs (as `run --qemu`, one per slot), "
    "comma-separated. Repeat per VM; none is fine (add them later).",
)
@click.option(
    "--vm-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also serve one VM per DIR/NAME.conf file (USBGATE_LISTEN=ADDR, USBGATE_QEMU=ADDR "
    "[ADDR...]: the files of usbgate@NAME.service, e.g. /etc/vmshield/usbgate). SIGHUP "
    "(systemctl reload) reads it again: VMs whose file is gone or changed are removed, new "
    "and changed ones added; a file that cannot be read leaves its VM as it was.",
)
@control_option
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep the VMs added with `usbgate host add` in this file (e.g. "
    "/run/vmshield/usbgate-host.json) and serve them again when usbgate restarts.",
)
@click.option(
    "--control-group",
    metavar="GROUP",
    help="Also let members of GROUP (e.g. vmshield) use the control socket; without it only "
    "root and the user running usbgate may (checked with SO_PEERCRED).",
)
@rules_options
@gateway_options
@click.option("-v", "--verbose", is_flag=True, help="Log every connection and decision.")
def serve(
    vms: list[VmSpec],
    vm_dir: Path | None,
    control: Path,
    state: Path | None,
    control_group: str | None,
    db: str | None,
    rules_file: Path | None,
    poll_ms: float,
    verbose: bool,
    **gateway: Any,
) -> None:
    """Serve the usbredir sockets of every VM of this host until SIGINT/SIGTERM.

    Each VM behaves as under `usbgate run`: an owner connecting to its listening address is
    relayed to a free one of its QEMU slots under its rules, and is detached within
    milliseconds when `vmshield usb ...` stops allowing it. The rules of all VMs are polled
    together every --poll-ms on one SQLite connection (or pushed by one PostgreSQL LISTEN
    connection). Every add and remove is audited. A VM that cannot be served at start (its
    rules unreadable, its address taken) stops the command before anything is served.

    \b
    Example:
      usbgate host serve --control-group vmshield \\
          --vm web1=tcp:0.0.0.0:4000,unix:/run/vmshield/web1-usb0.sock
      usbgate host add web2 --listen tcp:0.0.0.0:4001 \\
          --qemu unix:/run/vmshield/web2-usb0.sock
      usbgate host list
      usbgate host remove web2
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="usbgate: %(levelname)s %(message)s",
    )
    try:
        group = None if control_group is None else group_id(control_group)
    except HostError as exc:
        raise click.BadParameter(str(exc), param_hint="--control-group") from exc
    try:
        from_dir = {} if vm_dir is None else _read_dir(vm_dir, strict=True)
    except HostError as exc:
        raise click.BadParameter(str(exc), param_hint="--vm-dir") from exc
    rules = _rule_source(db, rules_file)
    audit = _audit_sink(db, rules_file, max_per_vm=MAX_QUEUED_PER_VM)
    hub = Host(rules, audit, poll_interval=poll_ms / 1000, **gateway)
    try:
        server = ControlServer(hub, control, group=group, state=state)
        asyncio.run(_serve(hub, server, vms, vm_dir, from_dir,
                           audit))  # fmt: skip
    except (HostError, RuleSourceError) as exc:
        raise _fail(str(exc), getattr(exc, "exit_code", 1)) from exc
    except OSError as exc:
        raise _fail(f"cannot listen: {exc.strerror or exc}") from exc


def _read_dir(vm_dir: Path, *, strict: bool) -> dict[str, VmSpec]:
    """The VMs of --vm-dir; at start (``strict``) a file that cannot be read is an error."""
    specs, errors = read_vm_dir(vm_dir)
    if errors and strict:
        raise HostError(next(iter(errors.values())))
    return specs


async def _serve(hub: Host, control: ControlServer, vms: list[VmSpec], vm_dir: Path | None,
                 from_dir: dict[str, VmSpec], audit: AuditSink) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    managed = set(from_dir)
    reloads: set[asyncio.Task[None]] = set()
    one_at_a_time = asyncio.Lock()

    async def reload() -> None:
        async with one_at_a_time:
            await _reload()

    async def _reload() -> None:
        assert vm_dir is not None
        try:
            specs, errors = read_vm_dir(vm_dir)
        except HostError as exc:
            click.echo(f"usbgate: reload: {exc}; nothing changed", err=True)
            return
        for name, error in errors.items():
            click.echo(f"usbgate: reload: {error}; VM {name} left as it was", err=True)
            if name in hub.specs and name in managed:
                specs[name] = hub.specs[name]
        for error in await hub.sync(specs, managed):
            click.echo(f"usbgate: reload: {error}", err=True)
        managed.clear()
        managed.update(specs)
        click.echo(f"usbgate: reloaded {vm_dir}: serving {len(hub.gateways)} VM(s)", err=True)

    def on_hup() -> None:
        if vm_dir is None:
            click.echo("usbgate: SIGHUP ignored (no --vm-dir to read again)", err=True)
            return
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await hub.start([*vms, *from_dir.values()])
        for error in await control.restore():
            click.echo(f"usbgate: restore: {error}", err=True)
        await control.start()
        served = ", ".join(f"{n} on {g.bound_address}" for n, g in hub.gateways.items())
        click.echo(f"usbgate: host listening on control socket {control.path}; "
                   f"serving {len(hub.gateways)} VM(s){': ' if served else ''}{served}",
                   err=True)  # fmt: skip
        await stop.wait()
    finally:
        await control.stop()
        await hub.stop()
        await audit.aclose()


def _request(control: Path, request: dict[str, Any]) -> dict[str, Any]:
    try:
        return control_request(control, request)
    except HostError as exc:
        raise _fail(str(exc)) from exc


@host.command("add")
@click.argument("vm")
@listen_option("Where the VM's owners connect: tcp:HOST:PORT or unix:PATH.")
@qemu_option("The VM's usb-redir chardev, unix:PATH or tcp:HOST:PORT; repeat per slot.")
@control_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def add(vm: str, listen: Address, qemu: tuple[Address, ...], control: Path, as_json: bool) -> None:
    """Serve one more VM in the running host (its rules must be readable, its addresses free)."""
    reply = _request(control, {"op": "add", "vm": vm, "listen": str(listen),
                               "qemu": [str(q) for q in qemu]})  # fmt: skip
    if as_json:
        click.echo(json.dumps(reply["vm"], indent=2, sort_keys=True))
    else:
        click.echo(f"usbgate: vm {vm} listening on {reply['vm']['listening']}")


@host.command("remove")
@click.argument("vm")
@control_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def remove(vm: str, control: Path, as_json: bool) -> None:
    """Stop serving VM: its owners are disconnected and its devices detached."""
    reply = _request(control, {"op": "remove", "vm": vm})
    if as_json:
        click.echo(json.dumps(reply["vm"], indent=2, sort_keys=True))
    else:
        click.echo(f"usbgate: vm {vm} removed")


@host.command("list")
@control_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_vms(control: Path, as_json: bool) -> None:
    """The VMs the running host serves: addresses, sessions, attached devices."""
    vms = _request(control, {"op": "list"})["vms"]
    if as_json:
        click.echo(json.dumps({"vms": vms}, indent=2, sort_keys=True))
        return
    if not vms:
        click.echo("usbgate: no VMs served")
    for v in vms:
        qemu = ",".join(v["qemu"])
        click.echo(f"{v['vm']}  listen {v['listening']}  qemu {qemu}  rules {v['rules']}  "
                   f"sessions {v['sessions']}  attached {v['attached']}")  # fmt: skip
