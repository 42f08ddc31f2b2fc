"""The `vmshield` command: a thin click layer over keystore.services and nbd_plugin.

`TREE` below is the whole command tree, in one place: every group with every subcommand.
Each module of this package defines its commands; nothing registers itself, and a module
that is missing is an ImportError here, not a command that silently disappears.
"""

from __future__ import annotations

import click

from keystore.cli import (
    audit,
    destroy,
    disk,
    doctor,
    erase,
    image,
    initcmd,
    job,
    keystore_cmd,
    libvirt,
    perm,
    unlock,
    usb,
    user,
    vm,
)

#: (group, its subcommands), or a lone command
TREE: tuple[click.Command | tuple[click.Group, tuple[click.Command, ...]], ...] = (
    initcmd.init,
    doctor.doctor,
    (user.user, (user.add, user.passwd, user.unlock, user.list_)),
    (vm.vm, (vm.add, vm.list_, vm.show, vm.remove, unlock.unlock_vm)),
    (
        disk.disk,
        (
            disk.create,
            disk.serve_,
            disk.stop,
            disk.list_,
            disk.forget,
            destroy.destroy,
            unlock.enroll_host,
            unlock.unenroll_host,
        ),
    ),
    (perm.perm, (perm.set_, perm.show)),
    # the rule commands (allow, block, reject, list, remove) are made and added in usb.py
    (usb.usb, (usb.qemu_filter,)),
    (audit.audit, (audit.verify,)),
    (libvirt.libvirt, (libvirt.devices, libvirt.install_hook)),
    (job.job, (job.status,)),
    (keystore_cmd.keystore_group, (keystore_cmd.migrate,)),
    (
        image.image,
        (
            image.create,
            image.info,
            image.add_key,
            image.remove_key,
            image.passwd,
            image.test_passphrase,
            erase.erase,
        ),
    ),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmshield")
def main() -> None:
    """vmshield: encrypted VM disks served over NBD, deep erase, live USB whitelisting.

    Start with `vmshield init`, then `vmshield user add`, `vmshield vm add` and
    `vmshield disk create`. `vmshield image ...` works on LUKS images without a keystore.
    """


def _assemble(root: click.Group) -> None:
    for entry in TREE:
        if isinstance(entry, click.Command):
            root.add_command(entry)
            continue
        group, commands = entry
        for command in commands:
            group.add_command(command)
        root.add_command(group)


_assemble(main)
