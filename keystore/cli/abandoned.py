"""What the commands that meet `creating` disks share: finish the undo of killed creates.

Not a command: `disk create`, `disk list`, `disk serve`, `disk destroy` and `status` call
`reap` first (keystore.services.creating says when a create counts as abandoned).
"""

from __future__ import annotations

import click

from keystore.cli.options import actor
from keystore.location import Location
from keystore.services import creating
from keystore.services.store import Keystore
from nbd_plugin.errors import VmshieldError


def reap(db: Location | None) -> None:
    """Finish what killed `disk create`s left in keystore `db`, one note on stderr each.
    A keystore that cannot be read is left to the command's own error."""
    try:
        notes = creating.reap(Keystore(db), who=actor())
    except VmshieldError:
        return
    for note in notes:
        click.echo(f"note: {note}", err=True)
