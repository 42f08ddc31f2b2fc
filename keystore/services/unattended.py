"""The workflows that let a VM's disks open without a person (no click): `vm unlock`,
`disk enroll-host|unenroll-host` and `disk bind|unbind|rebind`.

Each authenticates the owner where a keyslot is opened with the owner's password (failures
count toward the lockout), changes the kernel keyring or the image (keystore.services.unlock,
keystore.services.binding) and appends one audit row. See docs/libvirt.md for what each way
of starting unattended protects against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from keystore.errors import Conflict
from keystore.models import Disk, DiskState, Vm
from keystore.services import binding, hookconf, unlock
from keystore.services.store import Keystore
from nbd_plugin.secrets import wipe


def ready_disk(store: Keystore, name: str) -> Disk:
    """Disk `name`, refused (Conflict) unless it is ready."""
    d = store.run(lambda r: r.get_disk(name))
    if d.state is not DiskState.READY:
        raise Conflict(f"disk {d.name} is {d.state.value}, not ready")
    return d


def host_key_path(given: Path | None) -> Path:
    """The host key file: `given`, else hook.conf's host_key (else its default)."""
    return given or hookconf.load_or_defaults().host_key


def _authenticate(store: Keystore, vm: Vm, password: bytes, who: str) -> None:
    store.run(lambda r: r.authenticate(vm.owner, password, actor=who, vm=vm.name))


def _audit(store: Keystore, who: str, action: str, target: str, detail: dict[str, Any]) -> None:
    store.run(lambda r: r.append_audit(who, action, target, detail))


# -- vm unlock ---------------------------------------------------------------------------


def require_root(vm: str) -> None:
    """The unlock lives in the caller's kernel keyring; the hook reads root's."""
    uid = os.geteuid()
    if uid != 0:
        raise unlock.UnlockError(
            f"vm unlock must run as root: the qemu hook runs as root under libvirtd and reads "
            f"root's kernel keyring, so as uid {uid} the password would wait in your own "
            f"keyring, where the hook never looks. Run `sudo vmshield vm unlock {vm}` (with the "
            "same --db), or have root enroll a host key for unattended starts "
            "(`sudo vmshield disk enroll-host DISK`)"
        )


def unlock_vm(store: Keystore, vm: Vm, password: bytes, ttl: int, *, who: str) -> None:
    """Verify the owner's password and leave it in root's keyring for `ttl` seconds."""
    _authenticate(store, vm, password, who)
    unlock.put(vm.uuid, password, ttl)
    _audit(store, who, "vm.unlock", vm.name, {"seconds": ttl})


def cancel_unlock(store: Keystore, vm: Vm, *, who: str) -> bool:
    """Withdraw `vm`'s pending unlock; whether there was one."""
    had = unlock.consume(vm.uuid)
    _audit(store, who, "vm.unlock.cancel", vm.name, {"pending": had})
    return had


# -- the host key ------------------------------------------------------------------------


def enroll_host(store: Keystore, disk: Disk, vm: Vm, password: bytes, key_file: Path,
                *, who: str) -> int:  # fmt: skip
    """Add a keyslot for the host key (made if absent) to `disk`; its index."""
    _authenticate(store, vm, password, who)
    key = unlock.ensure_host_key(key_file)
    try:
        slot = unlock.enroll_host(disk.path, password, bytes(key))
    finally:
        wipe(key)
    detail = {"disk": disk.name, "keyslot": slot, "host_key": str(key_file)}
    _audit(store, who, "disk.enroll_host", disk.vm, detail)
    return slot


def unenroll_host(store: Keystore, disk: Disk, key_file: Path, *, who: str) -> int:
    """Remove the keyslot the host key opens from `disk` (no password needed); its index."""
    key = unlock.read_host_key(key_file)
    if key is None:
        raise unlock.UnlockError(f"no host key at {key_file}: disk {disk.name} is not enrolled")
    try:
        slot = unlock.unenroll_host(disk.path, bytes(key))
    finally:
        wipe(key)
    _audit(store, who, "disk.unenroll_host", disk.vm, {"disk": disk.name, "keyslot": slot})
    return slot


# -- clevis bindings ---------------------------------------------------------------------


def _bound_detail(disk: Disk, bound: binding.Bound) -> dict[str, Any]:
    return {"disk": disk.name, "keyslot": bound.keyslot, "pins": bound.pins,
            "thumbprints": list(bound.thumbprints)}  # fmt: skip


def bind(store: Keystore, disk: Disk, vm: Vm, password: bytes, pin: str,
         config: dict[str, Any], *, who: str) -> dict[str, Any]:  # fmt: skip
    """Add a clevis-bound keyslot to `disk`; what was bound (as audited)."""
    _authenticate(store, vm, password, who)
    detail = _bound_detail(disk, binding.bind(disk.path, password, pin, config))
    _audit(store, who, "disk.bind", disk.vm, detail)
    return detail


def rebind(store: Keystore, disk: Disk, slot: int, thumbprint: str | None,
           *, who: str) -> dict[str, Any]:  # fmt: skip
    """Bind keyslot `slot` to its Tang server's current keys; what was bound (as audited)."""
    detail = _bound_detail(disk, binding.rebind(disk.path, slot, thumbprint))
    _audit(store, who, "disk.rebind", disk.vm, detail)
    return detail


def unbind(store: Keystore, disk: Disk, vm: Vm, password: bytes, slot: int, *, who: str) -> str:
    """Remove `disk`'s clevis-bound keyslot `slot` and its token; the pins it had."""
    _authenticate(store, vm, password, who)
    pins = binding.unbind(disk.path, password, slot)
    _audit(store, who, "disk.unbind", disk.vm, {"disk": disk.name, "keyslot": slot, "pins": pins})
    return pins
