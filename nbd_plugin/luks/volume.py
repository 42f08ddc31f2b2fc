"""An unlocked LUKS image: where its payload is and how to en/decrypt each sector.

``open_volume`` (``nbd_plugin.luks``) returns one; the serving code reads and writes the
payload through it and never sees a header.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from nbd_plugin.crypto.registry import SectorCipher

IV_MASK = (1 << 64) - 1
"""plain64 IVs are 64-bit sector numbers: dm-crypt wraps them (an iv_tweak near 2^64)."""


@dataclass
class Volume:
    """An unlocked image: where the payload is and how to en/decrypt it."""

    path: str
    fd: int
    fmt: str
    readonly: bool
    payload_offset: int  # bytes from the start of the file
    size: int  # plaintext bytes served
    sector_size: int
    iv_base: int
    iv_step: int
    cipher: SectorCipher
    uuid: str
    keyslot: int
    info: dict[str, Any] = field(default_factory=dict)

    def first_iv(self, sector: int) -> int:
        """IV of payload sector ``sector`` (counted in ``sector_size`` units), mod 2^64."""
        return (self.iv_base + sector * self.iv_step) & IV_MASK

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
