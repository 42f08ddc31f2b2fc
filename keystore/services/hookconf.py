"""The qemu hook's own configuration (default /etc/vmshield/hook.conf).

The hook runs under libvirtd: none of the admin's variables (VMSHIELD_DB ...) reach it, so
everything it needs is in this file, written by `vmshield libvirt install-hook`:

    [vmshield]
    db = /var/lib/vmshield/keystore.db     # the keystore (a file or a postgresql:// URL)
    run_dir = /run/vmshield                # disk sockets, usb-redir sockets, usbgate pid/log
    host_key = /etc/vmshield/host.key      # the key of `vmshield disk enroll-host`
    usb_listen = unix:{run_dir}/{vm}-usb.sock   # where USB owners reach the VM's usbgate
    usb_host =                             # a `usbgate host serve` control socket: add the
                                           # VM there instead of one `usbgate run` per VM
    timeout = 60                           # seconds a server gets to answer
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import os
from pathlib import Path

from keystore import paths
from keystore.errors import KeystoreError
from keystore.location import Location
from keystore.services.unlock import DEFAULT_HOST_KEY
from nbd_plugin import trust

DEFAULT_CONFIG = Path("/etc/vmshield/hook.conf")
CONFIG_ENV = "VMSHIELD_HOOK_CONF"
SECTION = "vmshield"
DEFAULT_USB_LISTEN = "unix:{run_dir}/{vm}-usb.sock"


class HookConfigError(KeystoreError):
    """hook.conf is missing a value or holds a wrong one."""


@dataclasses.dataclass(frozen=True)
class HookConfig:
    db: Location
    run_dir: Path
    host_key: Path
    usb_listen: str = DEFAULT_USB_LISTEN
    timeout: float = 60.0
    usb_host: str = ""  #: the control socket of `usbgate host serve`; "" = `usbgate run` per VM

    def usb_listen_for(self, vm: str) -> str:
        return self.usb_listen.format(run_dir=self.run_dir, vm=vm)

    def render(self) -> str:
        return (
            f"# vmshield qemu hook configuration (written by `vmshield libvirt install-hook`)\n"
            f"[{SECTION}]\n"
            f"db = {self.db}\n"
            f"run_dir = {self.run_dir}\n"
            f"host_key = {self.host_key}\n"
            f"usb_listen = {self.usb_listen}\n"
            f"timeout = {self.timeout:g}\n"
        ) + (f"usb_host = {self.usb_host}\n" if self.usb_host else "")


def config_path(given: Path | None = None) -> Path:
    """--config, else $VMSHIELD_HOOK_CONF, else /etc/vmshield/hook.conf."""
    if given is not None:
        return given
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG


def defaults(run_dir: Path | None = None) -> HookConfig:
    """The settings the hook uses where hook.conf says nothing (`run_dir`: one already known)."""
    return HookConfig(
        Location.parse(paths.default_db_path()),
        run_dir or paths.default_run_dir(),
        DEFAULT_HOST_KEY,
    )


#: the largest hook.conf read
MAX_CONFIG = 1 << 20


def load(path: Path) -> HookConfig:
    """Read hook.conf; HookConfigError with the file and key on anything wrong."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
    try:
        # the hook runs as root on what this file says (keystore, run directory, usbgate's
        # address): only root (or we) may have written it and its directories
        text = trust.read_file(path, "hook configuration", MAX_CONFIG).decode()
        parser.read_string(text, source=str(path))
    except trust.Untrusted as e:
        raise HookConfigError(
            f"{e}: others could have written it (it and every directory above it must "
            f"belong to root or uid {os.geteuid()} and be writable by no one else); refusing it"
        ) from None
    except OSError as e:
        raise HookConfigError(f"cannot read hook configuration {path}: {e.strerror}") from e
    except UnicodeDecodeError:
        raise HookConfigError(f"{path}: not UTF-8 text") from None
    except configparser.Error as e:
        raise HookConfigError(f"{path}: {e.message.splitlines()[0]}") from e
    if not parser.has_section(SECTION):
        raise HookConfigError(f"{path}: no [{SECTION}] section")
    sec = parser[SECTION]
    unknown = set(sec) - {f.name for f in dataclasses.fields(HookConfig)}
    if unknown:
        raise HookConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    base = defaults()
    try:
        timeout = float(sec.get("timeout", str(base.timeout)))
    except ValueError as e:
        raise HookConfigError(f"{path}: timeout must be a number of seconds") from e
    if "db" not in sec:
        raise HookConfigError(f"{path}: db = PATH is required (the keystore database)")
    usb_host = sec.get("usb_host", "").strip()
    if usb_host and not os.path.isabs(usb_host):
        raise HookConfigError(f"{path}: usb_host must be an absolute path (a control socket)")
    db = Location.parse(sec["db"])
    try:
        db.check_no_password()
    except ValueError as e:
        raise HookConfigError(f"{path}: {e}") from None
    return HookConfig(
        db=db,
        run_dir=Path(sec.get("run_dir", str(base.run_dir))),
        host_key=Path(sec.get("host_key", str(base.host_key))),
        usb_listen=sec.get("usb_listen", DEFAULT_USB_LISTEN),
        timeout=timeout,
        usb_host=usb_host,
    )


def load_or_defaults(path: Path | None = None) -> HookConfig:
    """hook.conf if it exists (for the CLI: the same run_dir and host_key as the hook)."""
    p = config_path(path)
    return load(p) if p.exists() else defaults()


def run_dirs() -> list[Path]:
    """Where servers may live: the hook's run directory (hook.conf) and this user's default;
    whichever cannot be known (no hook.conf one may trust, no runtime directory) is left out."""
    found: list[Path] = []
    with contextlib.suppress(KeystoreError):
        found.append(load_or_defaults().run_dir)
    with contextlib.suppress(KeystoreError):
        found.append(paths.default_run_dir())
    return list(dict.fromkeys(found))
