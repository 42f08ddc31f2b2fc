"""The `usbgate` command: a thin click layer over usbgate's modules."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from nbd_plugin.errors import ExitStatus
from usbgate.addresses import Address, parse_address
from usbgate.devices import NoUsbStack, list_devices
from usbgate.errors import RuleSourceError
from usbgate.gateway import HELLO_TIMEOUT, MAX_PER_PEER, POLL_INTERVAL, Gateway
from usbgate.rules.qemu_filter import report
from usbgate.session import IDLE_TIMEOUT, PROBE_TIMEOUT
from usbgate.sources import AuditSink, FileRuleSource, MemoryAuditSink, RuleSource

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, status: int = ExitStatus.ERROR) -> click.ClickException:
    """`Error: MESSAGE`, exiting with one of the product's statuses (nbd_plugin.errors)."""
    error = click.ClickException(message)
    vars(error)["exit_code"] = int(status)  # click declares exit_code on the class
    return error


def _address(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    try:
        if isinstance(value, tuple):
            return tuple(parse_address(v) for v in value)
        return None if value is None else parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def listen_option(help: str) -> Callable[[F], F]:
    """`--listen ADDR` (required): where the VM's owners connect."""
    return click.option("--listen", required=True, callback=_address, metavar="ADDR", help=help)


def qemu_option(help: str) -> Callable[[F], F]:
    """`--qemu ADDR` (required, repeated): the VM's usb-redir chardevs, one per slot."""
    return click.option(
        "--qemu", "qemu", required=True, multiple=True, callback=_address, metavar="ADDR",
        help=help,
    )  # fmt: skip


def rules_options(f: F) -> F:
    """`--db PATH` (the keystore) or `--rules-file FILE` (text rules)."""
    f = click.option(
        "--rules-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Take the rules from this text file instead of the keystore, one rule a line "
        "(`allow id 0781:5567 with-interface { 08:06:50 }`); the same rules for every VM. "
        "Changes apply live: replace the file atomically (write, then rename).",
    )(f)
    f = click.option(
        "--db",
        metavar="PATH|URL",
        envvar="VMSHIELD_DB",
        show_envvar=True,
        help="Keystore database with the VMs' USB rules and the audit trail: an SQLite file "
        "(default: /var/lib/vmshield/keystore.db for root, ~/.local/share/vmshield/keystore.db "
        "otherwise) or a postgresql:// URL shared by several hosts (changes pushed by NOTIFY).",
    )(f)
    return f


def gateway_options(f: F) -> F:
    """The timing and limit options of every VM's gateway (`run`, `host serve`)."""
    for option in reversed(_GATEWAY_OPTIONS):
        f = option(f)
    return f


_GATEWAY_OPTIONS = [
    click.option(
        "--poll-ms",
        type=click.FloatRange(min=1, max=1000),
        default=POLL_INTERVAL * 1000,
        show_default=True,
        help="How often to check the rules for changes, in milliseconds.",
    ),
    click.option(
        "--probe-timeout",
        type=click.FloatRange(min=0.1),
        default=PROBE_TIMEOUT,
        show_default=True,
        help="Seconds a device gets to answer the descriptor probe before it is denied.",
    ),
    click.option(
        "--hello-timeout",
        type=click.FloatRange(min=0.1),
        default=HELLO_TIMEOUT,
        show_default=True,
        help="Seconds an owner gets, once connected, to send its usbredir hello; until then it "
        "holds no usb-redir slot. Silent connections are closed and audited.",
    ),
    click.option(
        "--idle-timeout",
        type=click.FloatRange(min=0.1),
        default=IDLE_TIMEOUT,
        show_default=True,
        help="Seconds a connection may hold a usb-redir slot without a device announced (after "
        "its hello, or after an unplug); then it is closed and audited, and the slot is free.",
    ),
    click.option(
        "--max-per-peer",
        type=click.IntRange(min=1),
        default=MAX_PER_PEER,
        show_default=True,
        help="Connections at once from one IP address (or one local user on a unix socket); "
        "more are refused. Refusals are audited once, then counted per peer every 10 s.",
    ),
]


def _rule_source(db: str | None, rules_file: Path | None) -> RuleSource:
    if rules_file is not None:
        if db is not None:
            raise click.UsageError("give --db or --rules-file, not both")
        return FileRuleSource(rules_file)
    from usbgate.sources.keystore import keystore_rule_source

    return keystore_rule_source(db)


def _audit_sink(db: str | None, rules_file: Path | None, *, max_per_vm: int | None = None
                ) -> AuditSink:  # fmt: skip
    if rules_file is not None:
        return _LogAuditSink()
    from usbgate.sources.keystore import keystore_audit_sink

    return keystore_audit_sink(db, max_per_vm=max_per_vm)


class _LogAuditSink(MemoryAuditSink):
    """Without a keystore, decisions go to the log as JSON lines (journald keeps them)."""

    def record(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        line = json.dumps({"action": action, "vm": vm, **detail}, sort_keys=True, default=str)
        logging.getLogger("usbgate.audit").warning("%s", line)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmshield")
def main() -> None:
    """usbgate: a usbredir gateway that forwards only whitelisted USB devices to a VM.

    It sits between the device's owner (`usbredirect --to HOST:PORT` on the machine the
    device is plugged into) and the VM's `-device usb-redir` chardev, forwards a device only
    if the VM's USB rules allow it, and detaches it within 50 ms when they stop allowing it.
    Rules are managed with `vmshield usb ...`; every decision goes to the keystore's audit.
    """


@main.command()
@click.option("--vm", required=True, help="VM whose USB rules apply (its name in the keystore).")
@listen_option(
    "Where owners connect: tcp:HOST:PORT (for `usbredirect --to HOST:PORT`) or unix:PATH."
)
@qemu_option(
    "The VM's usb-redir chardev (QEMU: -chardev socket,server=on,...): unix:PATH or "
    "tcp:HOST:PORT. Repeat once per usb-redir device; each owner connection takes the "
    "first free one."
)
@rules_options
@gateway_options
@click.option(
    "--state",
    "state_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Publish the devices attached now to FILE (JSON, replaced whenever they change; "
    "removed on exit): `vmshield status` shows them. The libvirt hook gives "
    "RUN_DIR/VM-usbgate.state.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every connection and decision.")
def run(
    vm: str,
    listen: Address,
    qemu: tuple[Address, ...],
    db: str | None,
    rules_file: Path | None,
    poll_ms: float,
    probe_timeout: float,
    hello_timeout: float,
    idle_timeout: float,
    max_per_peer: int,
    state_file: Path | None,
    verbose: bool,
) -> None:
    """Run the gateway for one VM until SIGINT/SIGTERM.

    Each owner connection on --listen is relayed to a free --qemu slot. The device it
    announces is held until usbgate has read its descriptors and the VM's rules allow it;
    a denied device never reaches QEMU. When `vmshield usb ...` changes the rules so that
    an attached device is no longer allowed, usbgate detaches it (device_disconnect to
    QEMU, filter_reject to the owner, connection closed). Rule changes are seen by polling
    SQLite's `PRAGMA data_version` every --poll-ms; with `--db postgresql://...` they are
    pushed by LISTEN/NOTIFY from any host, and while the database connection is lost every
    device is denied (attached ones detached) until usbgate has reconnected.

    \b
    Example (QEMU started with
      -chardev socket,id=usbredir0,path=/run/vmshield/web1-usb0.sock,server=on,wait=off
      -device usb-redir,chardev=usbredir0,id=usb0):
      usbgate run --vm web1 --listen tcp:0.0.0.0:4000 \\
                  --qemu unix:/run/vmshield/web1-usb0.sock
      usbredirect --device 0781:5567 --to gateway-host:4000     # on the owner's machine
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="usbgate: %(levelname)s %(message)s",
    )
    rules = _rule_source(db, rules_file)
    audit = _audit_sink(db, rules_file)
    gateway = Gateway(vm, listen, qemu, rules, audit, poll_interval=poll_ms / 1000,
                      probe_timeout=probe_timeout, hello_timeout=hello_timeout,
                      idle_timeout=idle_timeout, max_per_peer=max_per_peer,
                      state_file=None if state_file is None else state_file.absolute())  # fmt: skip
    try:
        asyncio.run(_serve(gateway, audit))
    except RuleSourceError as exc:
        raise _fail(str(exc), exc.exit_code) from exc
    except OSError as exc:
        raise _fail(f"cannot listen on {listen}: {exc.strerror or exc}") from exc


async def _serve(gateway: Gateway, audit: AuditSink) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
        click.echo(f"usbgate: vm {gateway.vm} listening on {gateway.bound_address}", err=True)
        await stop.wait()
    finally:
        await gateway.stop()
        await audit.aclose()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def devices(as_json: bool) -> None:
    """List the USB devices plugged into this host (VID:PID, class, interfaces, serial).

    Run it where the devices are, to write rules: each line ends with a rule that allows
    exactly that device. Exits 0 with a plain message when the host has no USB stack.
    """
    try:
        found = list_devices()
    except NoUsbStack as exc:
        if as_json:
            click.echo(json.dumps({"devices": [], "error": str(exc)}, indent=2))
        else:
            click.echo(f"usbgate: {exc}")
        return
    if as_json:
        click.echo(json.dumps({"devices": [d.to_json() for d in found]}, indent=2))
        return
    if not found:
        click.echo("usbgate: no USB devices found")
        return
    for d in found:
        name = " ".join(x for x in (d.manufacturer, d.product) if x) or "-"
        click.echo(f"{d.bus:03d}/{d.address:03d}  {d.vid_pid}  class {d.device_class:02x}  "
                   f"serial {d.serial or '-'}  {name}")  # fmt: skip
        click.echo(f"         rule: {d.rule()}")


@main.command("qemu-filter")
@click.argument("vm")
@rules_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def qemu_filter(vm: str, db: str | None, rules_file: Path | None, as_json: bool) -> None:
    """Print QEMU's usb-redir `filter=` and libvirt's <redirfilter> for VM's rules.

    The same as `vmshield usb qemu-filter VM`, and it also reads --rules-file. The static
    filter is broader than the live rules, never narrower (see usbgate.rules.qemu_filter).
    """
    source = _rule_source(db, rules_file)
    try:
        rules = source.load(vm)
    except RuleSourceError as exc:
        raise _fail(str(exc), exc.exit_code) from exc
    finally:
        source.close()
    result = report(vm, rules)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
        return
    click.echo(result.text())
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


from usbgate.stick_cli import simulate_stick  # noqa: E402 - its own module (issue 14)

main.add_command(simulate_stick)
from usbgate.host_cli import host  # noqa: E402 - its own module: `usbgate host ...`

main.add_command(host)
