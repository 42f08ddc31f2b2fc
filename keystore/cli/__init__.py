"""The `vmshield` command: a thin click layer over keystore.services and nbd_plugin.

`TREE` below is the whole command tree, in one place: every group with every subcommand.
Each module of this package defines its commands; nothing registers itself, and a module
that is missing is an ImportError when its command runs (and in the test that builds the
whole tree), not a command that silently disappears. Modules are imported lazily, so a
command pays only for its own imports.

Errors are mapped here, once: every error of the product hierarchy (and a ValueError or an
OSError) a command raises becomes one `Error: ...` line with the error's own exit status
(nbd_plugin.errors.ExitStatus), Ctrl-C exits 130. Commands raise the services' errors as
they come; click's own (usage) errors stay click's.
"""

from __future__ import annotations

import importlib

import click

from nbd_plugin.errors import ExitStatus, VmshieldError

#: (name, "module:attribute" of the command or group, its subcommands as "module:attribute"),
#: modules of this package: one module per top-level command, named after it. A module is
#: imported only when its command runs (or when help lists it): `vmshield --version` loads
#: none, `vmshield usb block` only usb.py and what it needs, never the disk data path (numpy,
#: numba) or psycopg.
TREE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("init", "init:init", ()),
    ("status", "status:status", ()),
    ("doctor", "doctor:doctor", ()),
    (
        "user",
        "user:user",
        ("user:add", "user:passwd", "user:unlock", "user:list_", "user:remove"),
    ),
    ("vm", "vm:vm", ("vm:add", "vm:list_", "vm:show", "vm:set_", "vm:remove", "vm:unlock_vm")),
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
            "disk:destroy",
            "disk:enroll_host",
            "disk:unenroll_host",
            "disk:bind",
            "disk:unbind",
            "disk:rebind",
        ),
    ),
    ("perm", "perm:perm", ("perm:set_", "perm:show")),
    # the rule commands (allow, block, reject, list, remove) are made and added in usb.py
    ("usb", "usb:usb", ("usb:qemu_filter",)),
    ("audit", "audit:audit", ("audit:verify",)),
    ("libvirt", "libvirt:libvirt", ("libvirt:devices", "libvirt:install_hook")),
    ("job", "job:job", ("job:status", "job:cancel")),
    ("keystore", "keystore:keystore_group", ("keystore:migrate",)),
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
            "image:erase",
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


class CliError(click.ClickException):
    """`Error: MESSAGE` with a chosen exit status (see nbd_plugin.errors.ExitStatus)."""

    def __init__(self, message: str, exit_code: int = ExitStatus.ERROR) -> None:
        super().__init__(message)
        vars(self)["exit_code"] = int(exit_code)  # click declares exit_code on the class


def message(exc: BaseException) -> str:
    """The one line a user sees for `exc` (an OSError as `FILE: reason`)."""
    if isinstance(exc, OSError) and not isinstance(exc, VmshieldError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return str(exc)


def fail(exc: BaseException) -> CliError:
    """`exc` as the CLI reports it: its message and its exit status."""
    if isinstance(exc, KeyboardInterrupt):
        return CliError(message(exc), ExitStatus.INTERRUPTED)
    return CliError(message(exc), getattr(exc, "exit_code", ExitStatus.ERROR))


#: what a command may raise and `fail` reports as one line (anything else is a bug: traceback)
REPORTED = (VmshieldError, ValueError, OSError, KeyboardInterrupt)


class _Tree(click.Group):
    """The root group: its commands come from TREE, each module imported on first use."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise  # click's own: a closed pipe on stdout is no error to report
        except REPORTED as e:
            raise fail(e) from e

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


def run() -> None:
    """The `vmshield` command (console script and the package's /usr/bin/vmshield): before
    anything is read, the process may not dump core, its user's other processes may not
    ptrace it or read its memory, and its pages stay out of swap (passphrases, passwords,
    master keys pass through it). Where the memory cannot be
    locked (no CAP_IPC_LOCK and a finite RLIMIT_MEMLOCK: an unprivileged user), the command
    says so once, when it first reads a secret. Then the command tree. Tests drive ``main``
    in process instead, which leaves the test runner as it was."""
    import sys

    from keystore.cli.options import memory_not_locked
    from nbd_plugin.serve.hardening import harden_process, lock_all_memory

    for problem in harden_process():
        print(f"vmshield: warning: {problem}", file=sys.stderr, flush=True)
    unlocked = lock_all_memory()
    if unlocked is not None:
        memory_not_locked(unlocked)
    main()
