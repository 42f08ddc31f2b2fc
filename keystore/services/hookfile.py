"""The qemu hook file `vmshield libvirt install-hook` writes and `vmshield doctor` checks.

The file is a few lines naming this Python, this vmshield and hook.conf; the logic is
keystore.services.libvirt_hook. It runs as root under libvirtd, so it is installed only from
a Python and a package no other user can change (nbd_plugin.trust), and written, with its
hook.conf, by nbd_plugin.osutil.files.replace_file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from keystore.errors import KeystoreError
from keystore.services.hookconf import HookConfig
from nbd_plugin.osutil.files import replace_file
from nbd_plugin.trust import trusted_path

DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks/qemu.d")
HOOK_NAME = "vmshield"
HOOK_MARK = "# vmshield qemu hook"
HOOK_TEMPLATE = """#!{python} -I
{mark} (written by `vmshield libvirt install-hook`; the logic is in
# keystore.services.libvirt_hook). libvirtd runs it as `vmshield NAME OP SUBOP EXTRA` with the
# domain XML on stdin; it reads its settings from {config}.
import os
import sys
from pathlib import Path

LIB = {libdir_repr}  # where this vmshield is (the package: /usr/lib/vmshield/lib)
if not os.path.isdir(os.path.join(LIB, "keystore")):
    # vmshield was removed: leave every domain alone (one that used its disks fails in QEMU)
    print(f"vmshield hook: vmshield is no longer in {{LIB}}; remove {{sys.argv[0]}}",
          file=sys.stderr)
    sys.exit(0)
sys.path.insert(0, LIB)

from keystore.services.libvirt_hook import run

sys.exit(run(sys.argv[1:], config=Path({config_repr})))
"""


class HookInstallError(KeystoreError):
    """The hook cannot be installed (untrusted code, another program's hook, no write)."""


def hook_text(conf: Path) -> str:
    """The hook file install-hook writes for this Python, this vmshield and `conf`."""
    import keystore

    libdir = os.path.dirname(os.path.dirname(os.path.abspath(keystore.__file__)))
    return HOOK_TEMPLATE.format(python=sys.executable, mark=HOOK_MARK, config=conf,
                                config_repr=repr(str(conf)), libdir_repr=repr(libdir))  # fmt: skip


def refuse_untrusted_code() -> None:
    """The hook runs this Python and this package as root: refuse to install it if another
    user could replace either (a venv in someone's home, a checkout others can write)."""
    import keystore

    for what, where in (("Python", os.path.dirname(os.path.abspath(sys.executable))),
                        ("vmshield package", os.path.dirname(keystore.__file__))):  # fmt: skip
        if trusted_path(where) is None:
            raise HookInstallError(
                f"the hook would run the {what} in {where} as root, but another user owns or "
                "can write it or a directory above it; install vmshield where only root can "
                "write (e.g. a venv under /opt) and run install-hook from there"
            )


def install(hooks_dir: Path, conf: Path, cfg: HookConfig) -> bool:
    """Write hook.conf `conf` from `cfg` and the hook into `hooks_dir`; whether a vmshield
    hook was there before (libvirtd uses an update at once, a new hook after a restart)."""
    refuse_untrusted_code()
    hook = hooks_dir / HOOK_NAME
    if hook.exists() and HOOK_MARK not in hook.read_text(errors="replace"):
        raise HookInstallError(f"{hook} exists and is not vmshield's hook; not replacing it")
    existed = hook.exists()
    try:
        replace_file(str(conf), cfg.render().encode(), 0o644, create_dir=0o755)
        replace_file(str(hook), hook_text(conf).encode(), 0o755, create_dir=0o755)
    except OSError as e:
        raise HookInstallError(f"cannot install the hook: {e}") from e
    return existed
