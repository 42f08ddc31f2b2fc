"""The `vmshield` command: a thin click layer over keystore.services and nbd_plugin.

`TREE` below is the whole command tree, in one place: every group with every subcommand.
Each module of this package defines its commands; nothing registers itself, and a module
that is missing is an ImportError when its command runs (and in the test that builds the
whole tree), not a command that silently disappears. Modules are imported lazily, so a
command pays only for its own imports.
"""

from __future__ import annotations

import importlib

import click

#: (name, "module:attribute" of the command or group, its subcommands as "module:attribute"),
#: modules of this package. A module is imported only when its command runs (or when help
#: lists it): `vmshield --version` loads none, `vmshield usb block` only usb.py and what it
#: needs, never the disk data path (numpy, numba) or psycopg.
TREE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("init", "initcmd:init", ()),
    ("status", "status:status", ()),
    ("doctor", "doctor:doctor", ()),
    (
        "user",
        "user:user",
        ("user:add", "user:passwd", "user:unlock", "user:list_", "user:remove"),
    ),
    ("vm", "vm:vm", ("vm:add", "vm:list_", "vm:show", "vm:set_", "vm:remove", "unlock:unlock_vm")),
    (
        "disk",
        "disk:disk",
        (
            "disk:create",
            "disk:serve_",
            "disk:stop",
            "disk:list_",
            "disk:forget",
            "disk:import_",
            "destroy:destroy",
            "unlock:enroll_host",
            "unlock:unenroll_host",
            "bind:bind",
            "bind:unbind",
            "bind:rebind",
        ),
    ),
    ("perm", "perm:perm", ("perm:set_", "perm:show")),
    # the rule commands (allow, block, reject, list, remove) are made and added in usb.py
    ("usb", "usb:usb", ("usb:qemu_filter",)),
    ("audit", "audit:audit", ("audit:verify",)),
    ("libvirt", "libvirt:libvirt", ("libvirt:devices", "libvirt:install_hook")),
    ("job", "job:job", ("job:status", "job:cancel")),
    ("keystore", "keystore_cmd:keystore_group", ("keystore_cmd:migrate",)),
    (
        "image",
        "image:image",
        (
            "image:create",
            "image:info",
            "image:add_key",
            "image:remove_key",
            "image:passwd",
            "image:test_passphrase",
            "erase:erase",
        ),
    ),
)


def load(ref: str) -> click.Command:
    """The command `ref` ("module:attribute" of this package) names, its module imported."""
    module, _, attribute = ref.partition(":")
    command = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    if not isinstance(command, click.Command):
        raise TypeError(f"{ref} is not a click command")
    return command


def build(name: str) -> click.Command | None:
    """Top-level command `name` with its subcommands added, None if TREE has no such name."""
    for entry_name, ref, subcommands in TREE:
        if entry_name == name:
            command = load(ref)
            if isinstance(command, click.Group):
                for sub in subcommands:
                    command.add_command(load(sub))
            return command
    return None


class _Interrupted(click.ClickException):
    """Ctrl-C that no command turned into its own message: exit 130, as a shell reports it."""

    exit_code = 130


class _Tree(click.Group):
    """The root group: its commands come from TREE, each module imported on first use."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted("interrupted (Ctrl-C)") from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, _, _ in TREE)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            command = build(cmd_name)
            if command is None:
                return None
            self.add_command(command, cmd_name)
        return self.commands[cmd_name]


@click.group(cls=_Tree, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmshield")
@click.option(
    "--db",
    "db",
    default=None,
    metavar="PATH|URL",
    help="Keystore (SQLite file or postgresql:// URL) for the command that follows, as its "
    "own --db (see the command's --help); given both ways, they must agree.",
)
def main(db: str | None) -> None:
    """vmshield: encrypted VM disks served over NBD, deep erase, live USB whitelisting.

    Start with `vmshield init`, then `vmshield user add`, `vmshield vm add` and
    `vmshield disk create`. `vmshield image ...` works on LUKS images without a keystore.
    The keystore is chosen with `--db` before the command (`vmshield --db URL disk list`,
    as `virsh -c`) or after it, or with VMSHIELD_DB.
    """
