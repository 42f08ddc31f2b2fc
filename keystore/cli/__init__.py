"""The `vmshield` command: a thin click layer over the importable logic."""

from __future__ import annotations

import click

from keystore.cli.image import image


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmshield")
def main() -> None:
    """vmshield: encrypted VM disks served over NBD, deep erase, live USB whitelisting.

    Start with `vmshield init`, then `vmshield user add`, `vmshield vm add` and
    `vmshield disk create`. `vmshield image ...` works on LUKS images without a keystore.
    """


main.add_command(image)

# keystore commands (keystore developer): one module per group, options in options.py
from keystore.cli.audit import audit  # noqa: E402
from keystore.cli.disk import disk  # noqa: E402
from keystore.cli.initcmd import init  # noqa: E402
from keystore.cli.libvirt import libvirt  # noqa: E402
from keystore.cli.perm import perm  # noqa: E402
from keystore.cli.usb import usb  # noqa: E402
from keystore.cli.user import user  # noqa: E402
from keystore.cli.vm import vm  # noqa: E402

for _command in (init, user, vm, disk, perm, usb, audit, libvirt):
    main.add_command(_command)


def _add_job_group() -> None:
    """`vmshield job ...` comes from keystore/cli/destroy.py (erase developer) once it exists."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("keystore.cli.destroy") is None:
        return
    job = getattr(importlib.import_module("keystore.cli.destroy"), "job", None)
    if isinstance(job, click.Command):
        main.add_command(job)


_add_job_group()
