"""Erase methods as data: a name, the pattern of each pass, and where the method comes from.

A method is a tuple of passes; each pass writes one `Pattern` over every allocated byte of the
target. `crypto` has no overwrite pass at all: it only destroys the LUKS key material, which
every other method also does first. Adding a method is adding one `Method(...)` to `METHODS`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Pattern(enum.Enum):
    """What one overwrite pass writes."""

    ZERO = "00"
    """Every byte 0x00."""
    ONES = "ff"
    """Every byte 0xFF."""
    RANDOM = "random"
    """An AES-256-CTR keystream derived from the erase's key and the pass number."""

    @property
    def fill_byte(self) -> int | None:
        """The constant byte of a fixed pattern, None for RANDOM."""
        return {Pattern.ZERO: 0x00, Pattern.ONES: 0xFF}.get(self)


Z, F, R = Pattern.ZERO, Pattern.ONES, Pattern.RANDOM


@dataclass(frozen=True)
class Method:
    """One erase method."""

    name: str
    passes: tuple[Pattern, ...]
    source: str
    summary: str

    @property
    def overwrites(self) -> bool:
        """True when the method overwrites the payload, False for a crypto-erase only."""
        return bool(self.passes)

    def describe(self) -> str:
        """Passes as a short string, e.g. "00, FF, random"."""
        if not self.passes:
            return "keyslot wipe only"
        return ", ".join(
            p.value.upper() if p.fill_byte is not None else "random" for p in self.passes
        )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "crypto",
            (),
            "NIST SP 800-88 Rev. 2, cryptographic erase",
            "wipe every LUKS keyslot and the header digest: the ciphertext stays, unreadable",
        ),
        Method("zero", (Z,), "NIST SP 800-88 Rev. 2, Clear (single overwrite)", "one pass of 0x00"),
        Method("random", (R,), "single pass of a CSPRNG keystream", "one pass of random data"),
        Method(
            "dod3",
            (Z, F, R),
            "DoD 5220.22-M (3 passes), as cited by the thesis",
            "0x00, 0xFF, random",
        ),
        Method(
            "bmb21-2007",
            (F, R, R, R, F, Z),
            "BMB-21-2007 (6 passes), as cited by the thesis",
            "0xFF, random x3, 0xFF, 0x00",
        ),
        Method(
            "dod7",
            (R, Z, F, R, R, Z, F),
            "DoD 5220.22-M ECE (7 passes, 'M7'), as cited by the thesis",
            "random, 0x00, 0xFF, random, random, 0x00, 0xFF",
        ),
    )
}


def get_method(name: str) -> Method:
    """The method called `name`; ValueError naming the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(METHODS)
        raise ValueError(f"unknown erase method {name!r} (known: {known})") from None
