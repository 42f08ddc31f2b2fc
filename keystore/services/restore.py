"""The host server's exports back after it restarted (`vmshield disk serve --restore`).

A restarted host server (crash, `systemctl restart vmshield-nbd`) starts empty: keys are never
written down. The keystore still records every export it served (the `servers` table) and
how each was opened (the audit row `disk.export.add`: way, keyslot, read-only, binding). For
each recorded export of this server that it no longer serves:

- recorded before this boot: the record is stale (the host rebooted, its VMs are gone) and
  is removed, never served again by itself;
- opened by a clevis token or the host key (`network`, `host-key`): opened the same way
  again, under the VM's unlock policy as it is now, with the same binding and mode;
- opened by its owner (a password, or a `vm unlock` that was used up): only with a new
  pending `vmshield vm unlock VM`; otherwise named, with what to run.

QEMU's NBD client reconnects by itself (`reconnect-delay` in the printed settings) once the
export is back. `disk serve --restore` runs from the unit's ExecStartPost, and whenever
`disk serve` or the libvirt hook had to start the server.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keystore.models import AuditEntry, Disk, Server, Vm
from keystore.services import hostdisk, opening, serve, unlock
from keystore.services.nbdproc import Endpoint, HostFiles
from keystore.services.store import Keystore
from nbd_plugin.errors import VmshieldError
from nbd_plugin.serve.control import Code
from nbd_plugin.serve.peers import Binding

#: how far back (rows per VM) the audit trail is read for how an export was opened
AUDIT_WINDOW = 5000
#: the ways restore opens a disk again by itself
UNATTENDED = ("network", "host-key")


@dataclasses.dataclass
class Outcome:
    """What `restore` did, per disk."""

    restored: dict[str, str] = dataclasses.field(default_factory=dict)  #: disk -> how
    served: list[str] = dataclasses.field(default_factory=list)  #: still served: untouched
    dropped: list[str] = dataclasses.field(default_factory=list)  #: records from before boot
    owner: dict[str, str] = dataclasses.field(default_factory=dict)  #: disk -> what to run
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  #: disk -> why

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        out = [f"restored {d} ({how})" for d, how in self.restored.items()]
        out += [f"dropped {d}: recorded before this boot" for d in self.dropped]
        out += [f"NOT restored {d}: {what}" for d, what in self.owner.items()]
        out += [f"FAILED {d}: {why}" for d, why in self.failed.items()]
        return out


def boot_time() -> datetime | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return datetime.fromtimestamp(int(line.split()[1]), UTC)
    except (OSError, ValueError):
        pass
    return None


def last_added(audit: list[AuditEntry], disk: str) -> dict[str, Any] | None:
    """The detail of the most recent export add of `disk` in `audit` (oldest first)."""
    for e in reversed(audit):
        if e.action == serve.EXPORT_ADDED and e.detail.get("disk") == disk:
            return e.detail
    return None


def _binding(detail: dict[str, Any]) -> Binding | None:
    b = detail.get("bind")
    if not isinstance(b, dict) or not isinstance(b.get("uuid"), str):
        return None
    domain = b.get("domain")
    return Binding(b["uuid"], domain if isinstance(domain, str) else None)


def restore(
    store: Keystore, files: HostFiles, *, who: str, host_key: Path | None, timeout: float = 60.0
) -> Outcome:
    """Serve again what the keystore records as exports of `files`' server (see above)."""
    out = Outcome()
    pid, _ = hostdisk.ensure(files, timeout=timeout)
    running = hostdisk.exports(files) or {}
    boot = boot_time()
    mine: list[tuple[Server, str]] = []
    for s in store.run(lambda r: r.list_servers()):
        ep = Endpoint.parse(s.socket)
        if ep.export is not None and ep.socket == files.socket:
            mine.append((s, ep.export))
    key: bytearray | None = None
    try:
        for s, export in mine:
            if s.pid == pid and export in running:
                out.served.append(s.disk)
                continue
            if boot is not None and s.started < boot:
                _forget(store, s.disk, who)
                out.dropped.append(s.disk)
                continue
            if key is None and host_key is not None:
                try:
                    key = unlock.read_host_key(host_key) or bytearray()
                except VmshieldError as e:  # untrusted directory: the host key opens nothing
                    key = bytearray()
                    out.failed["host key"] = str(e).splitlines()[0]
            _one(store, files, s.disk, who=who, host_key=key or None, out=out, timeout=timeout)
    finally:
        if key is not None:
            key[:] = bytes(len(key))
    hostdisk.audit_events(store, files)
    if out.restored or out.dropped or out.owner or out.failed:  # not for a first start
        detail = {"server_pid": pid, **out.to_json()}
        store.run(lambda r: r.append_audit(who, "disk.export.restore", None, detail))
    return out


def _forget(store: Keystore, disk: str, who: str) -> None:
    store.run(lambda r: r.remove_server(disk, actor=who))


def _one(
    store: Keystore,
    files: HostFiles,
    name: str,
    *,
    who: str,
    host_key: bytearray | None,
    out: Outcome,
    timeout: float,
) -> None:
    d: Disk = store.run(lambda r: r.get_disk(name))
    v: Vm = store.run(lambda r: r.get_vm(d.vm))
    added = last_added(store.run(lambda r: r.list_audit(d.vm, AUDIT_WINDOW)), d.name) or {}
    how = added.get("how")
    pending = None if how in UNATTENDED else unlock.peek_key(v.uuid)
    if how not in UNATTENDED and pending is None:
        out.owner[d.name] = (
            f"opened by its owner: `vmshield vm unlock {v.name}` then "
            "`vmshield disk serve --restore` (or `vmshield disk serve "
            f"{d.name}` by hand)"
        )
        return
    owner_pw = None if pending is None else pending[1]
    try:
        way = opening.open_disk(d, v, owner_pw, host_key)
        try:
            serve.serve_recorded(
                store, d, bytes(way.secret), files, readonly=bool(added.get("readonly")),
                who=who, timeout=timeout, keyslot=way.keyslot, how=way.how,
                bind=_binding(added),
            )  # fmt: skip
        finally:
            way.wipe()
    except hostdisk.HostServerError as e:
        if e.code != Code.EXISTS:  # another restore was first
            out.failed[d.name] = str(e).splitlines()[0]
            return
        out.served.append(d.name)
        return
    except (VmshieldError, OSError) as e:
        out.failed[d.name] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return
    finally:
        if owner_pw is not None:
            owner_pw[:] = bytes(len(owner_pw))
    if way.how == "unlock" and pending is not None:
        unlock.consume_key(pending[0])
    out.restored[d.name] = way.how
