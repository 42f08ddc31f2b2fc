"""`vmshield libvirt ...`: the domain XML for a VM, and installing the qemu hook."""

from __future__ import annotations

from pathlib import Path

import click

from keystore import paths
from keystore.cli.options import (
    config_option,
    db_option,
    emit_json,
    json_option,
    resolve_location,
    run,
)
from keystore.location import Location
from keystore.models import Disk, DiskState, UsbRule, Vm
from keystore.repository import Repository
from keystore.services import hookconf, hookfile, libvirt_xml
from keystore.services.hookconf import HookConfig


@click.group()
def libvirt() -> None:
    """Run vmshield VMs under libvirt: `virsh start` serves the disks and the USB gate.

    \b
    Once per host:
      vmshield libvirt install-hook          # then restart libvirtd
    Per VM (domain name = VM name, or <uuid> = the VM's uuid):
      vmshield libvirt devices web1          # paste into the domain's <devices>
      vmshield vm unlock web1 --for 10m      # owner present; or, unattended:
      vmshield disk enroll-host web1-0
      virsh start web1
    """


async def _devices(r: Repository, vm: str) -> tuple[Vm, list[Disk], list[UsbRule]]:
    v = await r.get_vm(vm)
    return v, await r.list_disks(v.name), await r.list_usb_rules(v.name)


@click.command("devices")
@click.argument("vm")
@click.option(
    "--usb-slots",
    type=click.IntRange(0, 8),
    default=1,
    show_default=True,
    help="usb-redir slots (one USB device each); 0: no USB controller or redirection.",
)
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Socket directory (default: run_dir of the hook's configuration).")  # fmt: skip
@click.option("--isolated", is_flag=True,
              help="Each disk on a socket of its own, served by an nbdkit of its own (default: "
              "exports of the host disk server, one process for every disk).")  # fmt: skip
@config_option
@json_option
@db_option
def devices(
    vm: str, usb_slots: int, run_dir: Path | None, isolated: bool, config: Path | None,
    as_json: bool, db: Location | None,
) -> None:  # fmt: skip
    """Print the <devices> entries of VM for its libvirt domain.

    Its ready disks as NBD-over-unix <disk>s (exports of the host disk server the hook adds
    them to, with a reconnect delay; --isolated: a socket per disk), a
    qemu-xhci controller, one <redirdev type='unix'> per USB slot (QEMU listens, usbgate
    connects when an owner plugs a device in), and a <redirfilter> made from the VM's USB
    rules: QEMU itself refuses what the rules could never allow (a second line of defence;
    the filter is fixed at start, so regenerate it after changing the rules).
    """
    from usbgate.rules.qemu_filter import libvirt_redirfilter

    cfg = hookconf.load_or_defaults(config)
    rdir = (run_dir or cfg.run_dir).absolute()
    v, disks, rules = run(db, lambda r: _devices(r, vm))
    name, uuid = v.name, v.uuid
    ready = [d for d in disks if d.state is DiskState.READY]
    xml = libvirt_xml.devices_xml(
        name,
        ready,
        rdir,
        usb_slots=usb_slots,
        redirfilter=libvirt_redirfilter(rules) if usb_slots else None,
        isolated=isolated,
    )
    if as_json:
        emit_json({"vm": name, "uuid": uuid, "devices_xml": xml, "run_dir": str(rdir)})
        return
    click.echo(xml)
    click.echo(f"note: name the domain {name} or give it <uuid>{uuid}</uuid>", err=True)


def _default_run_dir() -> Path:
    """/run/vmshield for root; a non-root user's private runtime directory, or a clear
    refusal naming this command's own option (not `disk serve`'s --socket)."""
    try:
        return paths.default_run_dir()
    except paths.NoRunDir:
        raise click.ClickException(
            "no $XDG_RUNTIME_DIR (it is set by a login session) for the hook's sockets: give "
            "--run-dir DIR, a directory only you can write; the system libvirtd's hook is "
            "installed by root (`sudo vmshield libvirt install-hook`), with /run/vmshield"
        ) from None


@click.command("install-hook")
@click.option("--hooks-dir", type=click.Path(file_okay=False, path_type=Path),
              default=hookfile.DEFAULT_HOOKS_DIR, show_default=True,
              help="libvirt's qemu hook drop-in directory (session mode: "
              "~/.config/libvirt/hooks/qemu.d).")  # fmt: skip
@config_option
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the hook puts sockets, pid and log files (default /run/vmshield).",
)
@click.option(
    "--host-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Host key of `vmshield disk enroll-host` (default /etc/vmshield/host.key).",
)
@click.option("--usb-listen", metavar="ADDR",
              help="Where USB owners reach a VM's usbgate; {vm} and {run_dir} are replaced "
              f"(default {hookconf.DEFAULT_USB_LISTEN}).")  # fmt: skip
@click.option("--usb-host", type=click.Path(dir_okay=False, path_type=Path),
              help="The control socket of a running `usbgate host serve` (e.g. "
              "/run/vmshield/usbgate.ctl): the hook adds each VM there and removes it when "
              "the VM stops, instead of starting one `usbgate run` per VM.")  # fmt: skip
@db_option
def install_hook(
    hooks_dir: Path, config: Path | None, run_dir: Path | None, host_key: Path | None,
    usb_listen: str | None, usb_host: Path | None, db: Location | None,
) -> None:  # fmt: skip
    """Install the vmshield qemu hook and write its configuration.

    The hook runs under libvirtd, which passes none of your variables: the keystore path
    and the other settings are written to the configuration file (--config), and the
    hook file names this Python and that file. libvirtd reads new hook files only when it
    starts: restart it afterwards (an update of an existing hook applies at once).
    """
    hookfile.refuse_untrusted_code()  # before anything else is asked
    if run_dir is None:
        run_dir = _default_run_dir()
    base = hookconf.defaults(run_dir)
    location = resolve_location(db)
    try:  # hook.conf is readable by all: a password in it would be everyone's
        location.check_no_password()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    cfg = HookConfig(
        db=location.absolute(),
        run_dir=(run_dir or base.run_dir).absolute(),
        host_key=(host_key or base.host_key).absolute(),
        usb_listen=usb_listen or hookconf.DEFAULT_USB_LISTEN,
        usb_host=str(usb_host.absolute()) if usb_host is not None else "",
    )
    conf = hookconf.config_path(config).absolute()
    hook = hooks_dir.absolute() / hookfile.HOOK_NAME
    existed = hookfile.install(hooks_dir.absolute(), conf, cfg)
    click.echo(f"wrote {conf} (keystore {cfg.db}, run dir {cfg.run_dir})")
    click.echo(f"installed {hook}")
    if existed:
        click.echo("the hook existed before: libvirtd uses the new version at once")
    else:
        click.echo("restart libvirtd now (systemctl restart libvirtd): it reads new hook files "
                   "only when it starts")  # fmt: skip
