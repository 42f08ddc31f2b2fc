"""Disk sizes as qemu-img reads and prints them (`20G`, `1.5G`, `512M`, `1048576`).

The grammar is qemu-img's (QEMU 7.2, checked against `qemu-img create -f raw`): a decimal
number, or `0x` hexadecimal without a suffix; at most one suffix `b`/`B` (bytes), `k`, `M`, `G`,
`T`, `P` or `E` in either case, each a power of 1024; a fraction only with a suffix other
than bytes, rounded to the nearest byte; no space before the suffix and nothing after it;
at most 2**63 - 1 bytes. So `20GB` and `20GiB` are refused, as qemu-img refuses them, with
the spelling it takes instead. A LUKS image is then rounded up to its sector size, as
qemu-img's luks driver rounds up to 512 bytes.
"""

from __future__ import annotations

import dataclasses
import re
from decimal import ROUND_HALF_UP, Decimal

#: suffix -> (power of 1024, the unit's name)
UNITS: dict[str, tuple[int, str]] = {
    "": (0, "bytes"),
    "B": (0, "bytes"),
    "K": (1, "KiB"),
    "M": (2, "MiB"),
    "G": (3, "GiB"),
    "T": (4, "TiB"),
    "P": (5, "PiB"),
    "E": (6, "EiB"),
}
MAX_SIZE = (1 << 63) - 1
_NUMBER = re.compile(r"^\s*\+?(0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?)([bBkKmMgGtTpPeE]?)\Z")
_ALMOST = re.compile(r"^\s*\+?(\d+(?:\.\d*)?)\s*([kKmMgGtTpPeE])(?:i?[bB])?\s*\Z")
_HINT = "K, M, G, T, P, E are powers of 1024, as in qemu-img"


@dataclasses.dataclass(frozen=True)
class Size:
    """A parsed size: how many bytes, and how the text was read."""

    text: str
    nbytes: int
    unit: str
    """The unit the suffix named: bytes, KiB, MiB, GiB, TiB, PiB or EiB."""

    def explain(self) -> str:
        """`20G = 20 GiB (21474836480 bytes; K, M, G, ... are powers of 1024, ...)`."""
        if self.unit == "bytes":
            return f"{self.text.strip()} = {self.nbytes} bytes"
        return f"{self.text.strip()} = {human(self.nbytes)} ({self.nbytes} bytes; {_HINT})"

    def aligned(self, sector: int) -> int:
        """The size rounded up to whole `sector`s (what a LUKS image of this size holds)."""
        return -(-self.nbytes // sector) * sector


def parse_size(text: str) -> Size:
    """`text` as qemu-img reads a size; ValueError (saying what to write) if it would not."""
    m = _NUMBER.match(text)
    if not m:
        almost = _ALMOST.match(text)
        if almost:
            number, suffix = almost.groups()
            unit = UNITS[suffix.upper()][1]
            raise ValueError(
                f"size {text!r}: qemu-img refuses this spelling; write {number}{suffix.upper()} "
                f"(= {number} {unit}; {_HINT})"
            )
        raise ValueError(
            f"size {text!r}: use a number with an optional suffix K, M, G, T, P or E, "
            f"e.g. 20G or 1.5G ({_HINT})"
        )
    number, suffix = m.groups()
    power, unit = UNITS[suffix.upper()]
    if number.lower().startswith("0x"):
        if suffix:
            raise ValueError(f"size {text!r}: a hexadecimal size takes no suffix")
        nbytes = int(number, 16)
    else:
        value = Decimal(number)
        if power == 0 and value != value.to_integral_value():
            raise ValueError(f"size {text!r}: a fraction needs a unit, e.g. 1.5G")
        nbytes = int((value * (1024**power)).to_integral_value(ROUND_HALF_UP))
    if nbytes > MAX_SIZE:
        raise ValueError(f"size {text!r} is more than {MAX_SIZE} bytes (8 EiB)")
    return Size(text, nbytes, unit)


def image_size(text: str, sector: int) -> tuple[int, str]:
    """A new image's size in bytes (rounded up to whole sectors) and what was taken, for the
    user: `20G = 20 GiB (...)`, plus the rounding when there was some."""
    size = parse_size(text)
    if size.nbytes <= 0:
        raise ValueError(f"size {text!r}: an image needs at least one {sector}-byte sector")
    nbytes = size.aligned(sector)
    said = size.explain()
    if nbytes != size.nbytes:
        said += f", rounded up to {nbytes} bytes (whole {sector}-byte sectors)"
    return nbytes, said


def human(nbytes: int) -> str:
    """`21474836480` -> `20 GiB`, `1610612736` -> `1.5 GiB`, `1000` -> `1000 B`."""
    for power in range(6, 0, -1):
        scale = 1024**power
        if nbytes >= scale:
            value = nbytes / scale
            name = UNITS["KMGTPE"[power - 1]][1]
            if nbytes % scale == 0:
                return f"{nbytes // scale} {name}"
            return f"{value:.1f} {name}" if value < 100 else f"{value:.0f} {name}"
    return f"{nbytes} B"
