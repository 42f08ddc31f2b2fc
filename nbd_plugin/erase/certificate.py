"""The erase certificate: a JSON record of what was done, and its SHA-256 for the audit chain."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from nbd_plugin.erase.journal import DEVICE_JOURNAL_DIR, JournalState
from nbd_plugin.erase.methods import get_method
from nbd_plugin.erase.storage import nist_category
from nbd_plugin.osutil.files import replace_file

CERTIFICATE_VERSION = 1


@dataclass(frozen=True)
class Certificate:
    """A written certificate: its content, where it is, and the SHA-256 of its bytes."""

    data: dict[str, Any]
    path: str
    sha256: str

    @property
    def verified(self) -> bool:
        """False when verification ran and found bytes that differ."""
        return bool(self.data["verification"]["result"] != "failed")


def tool_version() -> str:
    """vmshield's installed version."""
    try:
        return metadata.version("vmshield")
    except metadata.PackageNotFoundError:
        return "unknown"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def default_path(target: str, *, block_device: bool, started: float) -> str:
    """Beside a file target; under /var/lib/vmshield/erase/ for a block device."""
    if block_device:
        name = os.path.realpath(target).strip("/").replace("/", "_")
        stamp = datetime.fromtimestamp(started, UTC).strftime("%Y%m%dT%H%M%SZ")
        return os.path.join(DEVICE_JOURNAL_DIR, f"{name}-{stamp}.erase-certificate.json")
    return os.path.abspath(target) + ".erase-certificate.json"


def build(
    state: JournalState, *, size: int, finished: float, unlinked: bool, storage: dict[str, Any]
) -> dict[str, Any]:
    """The certificate content for a finished erase described by its journal."""
    method = get_method(state.method)
    allocated = sum(e[1] for e in state.extents)
    crypto = state.crypto or {"performed": False}
    overwritten = sum(int(p["bytes"]) for p in state.passes) + int(crypto.get("bytes", 0))
    return {
        "certificate_version": CERTIFICATE_VERSION,
        "tool": {"name": "vmshield", "version": tool_version()},
        "host": socket.gethostname(),
        "target": {
            "path": os.path.abspath(state.target),
            "kind": storage["kind"],
            "size": size,
            "allocated_bytes": allocated,
            "extents": len(state.extents),
            "luks_version": state.luks_version,
            "hard_links": state.links,
        },
        "method": {
            "name": method.name,
            "passes": [p.value for p in method.passes],
            "source": method.source,
        },
        "crypto_erase": crypto,
        "passes": state.passes,
        "keystream": {
            "algorithm": "AES-256-CTR, key HMAC-SHA256(erase_key, 'vmshield-erase-pass' || "
            "int64be(pass)), counter offset/16",
            "erase_key": state.key,
            "note": "predicts the random passes only, so anyone can re-verify the final pattern",
        },
        "bytes_overwritten": overwritten,
        "verification": state.verification or {"result": "skipped"},
        "discard": state.discard or {"performed": False},
        "unlinked": unlinked,
        "unlink": state.unlink or {"performed": unlinked},
        "started": _iso(state.started),
        "finished": _iso(finished),
        "duration_seconds": round(finished - state.started, 3),
        "resumed": state.resumed,
        "storage": storage,
        "nist_sp800_88_rev2": nist_category(
            storage, bool(crypto.get("performed")), bool(state.passes)
        ),
    }


def write(data: dict[str, Any], path: str) -> Certificate:
    """Write the certificate (0644, durable) and return it with its SHA-256."""
    blob = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    replace_file(path, blob, 0o644, create_dir=0o755)
    return Certificate(data, path, hashlib.sha256(blob).hexdigest())
