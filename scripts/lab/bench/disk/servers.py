"""The servers measured by `scripts/bench`: one entry per table row.

Adding a row is adding a ``Server`` to ``SERVERS`` (or passing extra ones to ``cli.run``).
The Python floor runs in every thread model (``FLOORS``); the floor is the fastest of them.
``image`` names which image of the run the server serves: "plain" (raw file) or "luks" (a
LUKS1 aes-xts-plain64 image); another format gets its own image kind in ``cli.IMAGES``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from scripts.lab import ROOT

REPO = str(ROOT)
PLUGIN = os.path.join(REPO, "nbd_plugin", "plugin.py")
FLOOR_PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_plugin.py")


@dataclass(frozen=True)
class Paths:
    """What a server command line needs: its socket, image and passphrase file."""

    socket: str
    image: str
    passphrase_file: str


Argv = Callable[[Paths], list[str]]


@dataclass(frozen=True)
class Server:
    """One row of the table."""

    key: str  # short name, used in JSON and for ratios
    label: str  # what the table prints
    image: str  # "plain" or "luks"
    argv: Argv
    derives_per_connection: bool = False  # the luks filter runs PBKDF2 on every connect


def _nbdkit(*args: str) -> Argv:
    return lambda p: ["nbdkit", "-f", "--exit-with-parent", "-U", p.socket, *args]


def _file(p: Paths) -> list[str]:
    return _nbdkit("file", f"file={p.image}")(p)


def _floor(model: str) -> Argv:
    return lambda p: _nbdkit("python", FLOOR_PLUGIN, f"file={p.image}", f"thread_model={model}")(p)


def _luks_filter(p: Paths) -> list[str]:
    return _nbdkit("--filter=luks", "file", f"file={p.image}", f"passphrase=+{p.passphrase_file}")(
        p
    )


def _qemu_nbd(p: Paths) -> list[str]:
    return [
        "qemu-nbd",
        "--object",
        f"secret,id=s0,file={p.passphrase_file}",
        "--image-opts",
        f"driver=luks,key-secret=s0,file.filename={p.image}",
        "--persistent",  # serve more than the first connection
        "-k",
        p.socket,
    ]


def _vmshield(p: Paths) -> list[str]:
    return _nbdkit("python", PLUGIN, f"image={p.image}", f"passphrase=+{p.passphrase_file}")(p)


def _vmshield_numpy(p: Paths) -> list[str]:
    return [*_vmshield(p), "data_path=numpy"]


SERVERS: list[Server] = [
    Server("file", "nbdkit file (plaintext, C ceiling)", "plain", _file),
    Server("floor", "nbdkit python plaintext, parallel", "plain", _floor("parallel")),
    Server(
        "floor-serialize",
        "nbdkit python plaintext, serialize_requests",
        "plain",
        _floor("serialize_requests"),
    ),
    Server(
        "floor-serialize-all",
        "nbdkit python plaintext, serialize_all_requests",
        "plain",
        _floor("serialize_all_requests"),
    ),
    Server("luks", "nbdkit luks filter (C peer)", "luks", _luks_filter, True),
    Server("qemu", "qemu-nbd luks driver (QEMU peer)", "luks", _qemu_nbd),
    Server("vmshield", "vmshield plugin", "luks", _vmshield),
    Server("vmshield-luks2", "vmshield plugin, LUKS2 4096-byte sectors", "luks2", _vmshield),
    Server("vmshield-numpy", "vmshield plugin, numpy path (no numba)", "luks", _vmshield_numpy),
]

SUBJECT = "vmshield"
"""The row the ratios are computed for (LUKS1, cryptsetup's 512-byte sectors)."""
SUBJECTS = (SUBJECT, "vmshield-luks2")
"""Every row with ratios of its own: LUKS1 and the LUKS2 that `vmshield disk create` makes."""


def before(tree: str) -> list[Server]:
    """Rows for another checkout's plugin (``--before DIR``: the code before a change, run in
    the same minutes as the code after)."""
    plugin = os.path.join(os.path.abspath(tree), "nbd_plugin", "plugin.py")
    if not os.path.isfile(plugin):
        raise FileNotFoundError(f"{tree}: no nbd_plugin/plugin.py there")
    if not os.path.isdir(os.path.join(tree, ".venv")):  # the plugin imports from TREE/.venv
        raise FileNotFoundError(
            f"{tree}: no .venv there (the plugin imports its packages from it; "
            f"ln -s {os.path.join(REPO, '.venv')} {os.path.join(tree, '.venv')})"
        )

    def argv(p: Paths) -> list[str]:
        return _nbdkit("python", plugin, f"image={p.image}", f"passphrase=+{p.passphrase_file}")(p)

    return [
        Server("before", f"before ({tree}), LUKS1", "luks", argv),
        Server("before-luks2", f"before ({tree}), LUKS2 4096-byte sectors", "luks2", argv),
    ]


RATIO_TO = ("floor", "luks", "qemu")
"""The rows the subject is compared with."""

FLOOR = "floor"
FLOORS = ("floor", "floor-serialize", "floor-serialize-all")
"""The Python floor in each thread model; ratios "vs floor" take the fastest of them per
column (``report.Report.peer``)."""
