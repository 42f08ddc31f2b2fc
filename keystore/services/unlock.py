"""Disk secrets for a start without a person at the keyboard: the kernel keyring and a host key.

libvirt runs the qemu hook under its daemon: no terminal, none of the caller's variables.
Two ways give the hook a disk's passphrase:

- owner present: `vmshield vm unlock VM --for 10m` puts the owner's password (the disk
  passphrase) into root's kernel keyring as a `user` key named ``vmshield:vm:<uuid>`` with a
  timeout; the hook reads it at `prepare begin` and invalidates it once the disks are served
  (one unlock, one start). The key never touches a disk, and the kernel drops it when its
  timeout runs out. Its permission mask (KEY_PERM) grants read, search and setattr to its
  *possessor* only, never to uid 0 as such: a root process in another session keyring (a
  container without a user namespace, a service with a private keyring) that finds the key
  by its id cannot read it. vmshield itself reads, times and invalidates it from a child
  running in a fresh session keyring that links root's user keyring (`_possessed`), so
  libvirtd's own keyring is never changed and QEMU, libvirtd's child, never possesses it.
  What this does not stop: a root process that deliberately links root's user keyring into
  its own session (`keyctl link @u @s`), as vmshield does; root can also ptrace the hook.
- unattended: `vmshield disk enroll-host DISK` adds a keyslot whose passphrase is a random
  host key kept in a root-only file (0600, default /etc/vmshield/host.key). The hook opens
  enrolled disks with it.

The `keyctl` tool (keyutils) moves the secret through pipes, never through argv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from secrets import token_hex

from keystore.errors import KeystoreError, image_error
from nbd_plugin import secrets, trust

KEYRING = "@u"  #: root's user keyring: shared by every uid-0 process, closed to other users
#: possessor: view, read, write, search, setattr (no link: it cannot be linked into another
#: keyring); user (uid 0 without possession): view only (`keyctl show` lists it); no one else
KEY_PERM = "0x2f010000"
#: run `keyctl ARGS` in a new session keyring linked to root's user keyring: the possessor
_POSSESSED = 'keyctl link @u @s >/dev/null && exec keyctl "$@"'
DEFAULT_HOST_KEY = Path("/etc/vmshield/host.key")
HOST_KEY_BYTES = 32
MAX_TTL = 24 * 3600


class UnlockError(KeystoreError):
    """The kernel keyring or the host key file could not be used."""


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> int:
    """`90`, `90s`, `10m`, `2h` -> seconds (1 s to 24 h)."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:], 0)
    number = t[:-1] if unit else t
    if not number.isascii() or not number.isdigit():
        raise ValueError(f"duration {text!r}: use seconds or a number with s, m or h (10m)")
    seconds = int(number) * (unit or 1)
    if not 1 <= seconds <= MAX_TTL:
        raise ValueError(f"duration {text!r}: must be between 1 s and {MAX_TTL // 3600} h")
    return seconds


def key_name(vm_uuid: str) -> str:
    return f"vmshield:vm:{vm_uuid}"


def _keyctl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("keyctl")
    if exe is None:
        raise UnlockError("keyctl not found: install the keyutils package")
    return subprocess.run(
        [exe, *args],
        input=data,
        capture_output=True,
        timeout=10,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"},
    )


def _possessed(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """`keyctl ARGS` as the key's possessor (a child in a fresh session keyring that links
    root's user keyring; ours and libvirtd's are left alone). Secrets go through stdin."""
    return _keyctl("session", "-", "/bin/sh", "-c", _POSSESSED, "sh", *args, data=data)


def _search(vm_uuid: str) -> str | None:
    found = _keyctl("search", KEYRING, "user", key_name(vm_uuid))
    return found.stdout.decode().strip() if found.returncode == 0 else None


def put(vm_uuid: str, secret: bytes, ttl: int) -> str:
    """Leave `secret` for the hook for `ttl` seconds; the new key's id.

    An earlier unlock of the VM is invalidated first and a new key made (never updated in
    place), so the hook's `consume_key` of the key it read cannot remove a newer unlock."""
    if not 1 <= ttl <= MAX_TTL:
        raise ValueError(f"unlock time must be between 1 s and {MAX_TTL // 3600} h")
    while (old := _search(vm_uuid)) is not None:
        if _possessed("invalidate", old).returncode != 0:
            raise UnlockError(f"cannot withdraw the earlier unlock (key {old})")
    added = _possessed("padd", "user", key_name(vm_uuid), KEYRING, data=secret)
    if added.returncode != 0:
        raise UnlockError(f"keyctl padd failed: {added.stderr.decode(errors='replace').strip()}")
    key = added.stdout.decode().strip()
    for step in (("timeout", key, str(ttl)), ("setperm", key, KEY_PERM)):
        done = _possessed(*step)
        if done.returncode != 0:
            _possessed("invalidate", key)
            why = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise UnlockError(f"keyctl {step[0]} failed: {' '.join(why)}")
    return key


def peek_key(vm_uuid: str) -> tuple[str, bytearray] | None:
    """(key id, secret) of the unlock left by `put` if it is still there, else None."""
    key = _search(vm_uuid)
    if key is None:
        return None
    got = _possessed("pipe", key)
    if got.returncode != 0:  # expired or invalidated between search and read
        return None
    return key, bytearray(got.stdout)


def peek(vm_uuid: str) -> bytearray | None:
    """The secret left by `put` if it is still there (not expired), else None."""
    found = peek_key(vm_uuid)
    return None if found is None else found[1]


def consume_key(key: str) -> bool:
    """Invalidate this very key (the one `peek_key` read); False if it is already gone."""
    return _possessed("invalidate", key).returncode == 0


def consume(vm_uuid: str) -> bool:
    """Invalidate whatever unlock of `vm_uuid` is pending (`vm unlock --cancel`)."""
    key = _search(vm_uuid)
    return key is not None and consume_key(key)


def remaining(vm_uuid: str) -> bool:
    """Is an unlock waiting for the hook?"""
    return _search(vm_uuid) is not None


# -- the host key ------------------------------------------------------------------------


def _untrusted(e: trust.Untrusted) -> UnlockError:
    return UnlockError(
        f"{e}: the host key must be a regular file owned by uid {os.geteuid()} with mode 0600, "
        "in directories no one else can write; refusing to use it"
    )


def read_host_key(path: Path) -> bytearray | None:
    """The host key, or None if there is none; refuses a file others could read or replace
    (nbd_plugin.trust), read as a key file (nbd_plugin.secrets)."""
    try:
        fd = trust.open_file(path, "host key", secret=True)
    except FileNotFoundError:
        return None
    except trust.Untrusted as e:
        raise _untrusted(e) from None
    except OSError as e:
        raise UnlockError(f"cannot read host key {path}: {e.strerror}") from e
    try:
        data = secrets.read_key_fd(fd, f"host key {path}")
    except secrets.SecretError as e:
        raise UnlockError(str(e)) from None
    finally:
        os.close(fd)
    if len(data) != 2 * HOST_KEY_BYTES:
        n = len(data)
        secrets.wipe(data)
        raise UnlockError(f"host key {path} is not a vmshield host key ({n} bytes)")
    return data


def ensure_host_key(path: Path) -> bytearray:
    """The host key, created (random, hex, mode 0600 from the start) if there is none yet."""
    existing = read_host_key(path)
    if existing is not None:
        return existing
    try:
        trust.private_dir(path.parent, "host key directory")
    except trust.Untrusted as e:
        raise _untrusted(e) from None
    key = bytearray(token_hex(HOST_KEY_BYTES).encode())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # another enroll won the race: use its key
        again = read_host_key(path)
        assert again is not None
        return again
    except OSError as e:
        raise UnlockError(f"cannot create host key {path}: {e.strerror}") from e
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


# -- the host keyslot --------------------------------------------------------------------

#: PBKDF2 iterations of the host keyslot: its passphrase is a random 256-bit key, so key
#: stretching adds nothing, and the hook opens it in milliseconds.
HOST_KEYSLOT_ITERATIONS = 1000


def host_key_opens(path: str, key: bytes) -> bool:
    """Does the host key open a keyslot of the image at `path`?"""
    from nbd_plugin import luks
    from nbd_plugin.errors import InvalidPassphrase, VmshieldError

    try:
        luks.open_volume(path, key, readonly=True).close()
    except InvalidPassphrase:
        return False
    except (VmshieldError, OSError) as e:
        raise image_error(UnlockError, e, path) from e
    return True


def enroll_host(path: str, owner_password: bytes, key: bytes) -> int:
    """Add a keyslot for the host key (opened with the owner's password); its index."""
    from nbd_plugin import luks
    from nbd_plugin.errors import VmshieldError

    if host_key_opens(path, key):
        raise UnlockError(f"{path} is already enrolled on this host")
    try:
        return luks.add_key(path, owner_password, key, iterations=HOST_KEYSLOT_ITERATIONS)
    except (VmshieldError, OSError, ValueError) as e:
        raise image_error(UnlockError, e, path) from e


def unenroll_host(path: str, key: bytes) -> int:
    """Remove the keyslot the host key opens (never the last one); its index."""
    from nbd_plugin import luks
    from nbd_plugin.errors import InvalidPassphrase, VmshieldError

    try:
        return luks.remove_key(path, key)
    except InvalidPassphrase as e:
        raise UnlockError(f"{path} is not enrolled on this host") from e
    except (VmshieldError, OSError, ValueError) as e:
        raise image_error(UnlockError, e, path) from e
