"""Server state behind the nbdkit callbacks: configuration, startup checks, the open disk.

The key is derived once per server (in ``config_complete``), not once per connection, so a
wrong passphrase or a damaged image stops nbdkit before it listens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nbd_plugin.crypto import jit
from nbd_plugin.errors import VmshieldError
from nbd_plugin.secrets import SecretError
from nbd_plugin.serve.disk import DISCARD_POLICIES, EncryptedDisk, open_disk
from nbd_plugin.serve.fence import Fence, parse_fd
from nbd_plugin.serve.hardening import lock_secret
from nbd_plugin.serve.passphrase import read_passphrase
from nbd_plugin.serve.peers import Binding, parse_uuid

DATA_PATHS = ("auto", *jit.PATHS)
READONLY_LONG = ("--readonly", "--read-only")
# nbdkit short options that take an argument (so a following word is not the plugin name).
SHORT_WITH_ARG = set("DeGgiPptuUx")
LONG_WITH_ARG = {
    "--debug",
    "--export",
    "--export-name",
    "--filter",
    "--group",
    "--ipaddr",
    "--log",
    "--mask-handshake",
    "--pidfile",
    "--port",
    "--run",
    "--selinux-label",
    "--threads",
    "--tls",
    "--tls-certificates",
    "--tls-psk",
    "--unix",
    "--user",
    "--vsock",
}


def readonly_from_argv(argv: list[str]) -> bool:
    """Whether nbdkit was started with -r/--readonly (options before the plugin name)."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            return False
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            if name in READONLY_LONG:
                return True
            if "=" not in arg and name in LONG_WITH_ARG:
                i += 1
        else:
            for j, letter in enumerate(arg[1:]):
                if letter == "r":
                    return True
                if letter in SHORT_WITH_ARG:
                    if j == len(arg) - 2:
                        i += 1
                    break
        i += 1
    return False


def nbdkit_readonly() -> bool:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    return readonly_from_argv(argv)


class ConfigError(VmshieldError):
    """A plugin parameter is missing or wrong."""


@dataclass
class ServerConfig:
    image: str | None = None
    passphrase: bytearray | None = None
    discard: str = "ignore"
    keyslot: int | None = None
    fence: Fence | None = None
    bind: str | None = None
    bind_domain: str | None = None
    control: str | None = None
    stats: str | None = None
    seen: set[str] = field(default_factory=set)

    def set(self, key: str, value: str) -> None:
        if key in self.seen:
            raise ConfigError(f"{key}= given twice")
        self.seen.add(key)
        if key == "image":
            self.image = os.path.abspath(value)
        elif key == "passphrase":
            try:
                self.passphrase = read_passphrase(value)
                lock_secret(self.passphrase)
            except SecretError as exc:
                raise ConfigError(str(exc)) from None
        elif key == "discard":
            if value not in DISCARD_POLICIES:
                raise ConfigError(f"discard={value}: use one of {', '.join(DISCARD_POLICIES)}")
            self.discard = value
        elif key == "keyslot":
            if not value.isascii() or not value.isdigit() or int(value) > 31:
                raise ConfigError(f"keyslot={value}: use a keyslot number, 0 to 31")
            self.keyslot = int(value)
        elif key == "data_path":
            if value not in DATA_PATHS:
                raise ConfigError(f"data_path={value}: use one of {', '.join(DATA_PATHS)}")
            jit.select(None if value == "auto" else value)
        elif key == "fence":
            try:
                self.fence = Fence(parse_fd(value))
            except (ValueError, OSError) as exc:
                raise ConfigError(str(exc)) from None
        elif key == "bind":
            try:
                self.bind = parse_uuid(value)
            except ValueError:
                msg = f"bind={value}: use the uuid of the VM that may connect"
                raise ConfigError(msg) from None
        elif key == "control":
            if not value or "\0" in value:
                raise ConfigError("control=: use the path of the control socket to create")
            self.control = os.path.abspath(value)
        elif key == "bind_domain":
            if not value or "\n" in value:
                raise ConfigError("bind_domain=: use the name of the VM's libvirt domain")
            self.bind_domain = value
        elif key == "stats":
            if not value:
                raise ConfigError("stats=: use the path of the file the I/O counters go to")
            self.stats = os.path.abspath(value)
        else:
            raise ConfigError(
                f"unknown parameter {key}= (known: image, passphrase, keyslot, discard, "
                "data_path, fence, bind, bind_domain, stats, control)"
            )

    @property
    def host_mode(self) -> bool:
        """control=SOCK: serve many exports added at run time (serve/hostserver.py)."""
        return self.control is not None

    def check_host_mode(self) -> None:
        """In host mode the disks come over the control socket: no per-disk parameter."""
        per_disk = sorted(self.seen - {"control", "data_path"})
        if per_disk:
            raise ConfigError(
                f"control= serves disks added over the control socket: {per_disk[0]}= "
                "belongs in the add request (or run a per-disk server without control=)"
            )

    def binding(self) -> Binding | None:
        """Which VM may connect (None: any client that reaches the socket, as before)."""
        if self.bind is None:
            if self.bind_domain is not None:
                raise ConfigError("bind_domain= needs bind=UUID (the VM's uuid)")
            return None
        return Binding(self.bind, self.bind_domain)

    def open_disk(self, readonly: bool) -> EncryptedDisk:
        if self.image is None:
            raise ConfigError("image=PATH is required")
        if self.passphrase is None:
            raise ConfigError("passphrase= is required (+FILE, -FD or - to prompt)")
        jit.defer()  # the kernels load after nbdkit forks; until then, the numpy path
        try:
            return open_disk(
                self.image, bytes(self.passphrase), readonly=readonly, keyslot=self.keyslot,
                discard=self.discard,
            )  # fmt: skip
        finally:
            self.passphrase[:] = bytes(len(self.passphrase))
            self.passphrase = None
