"""Rules every format follows: what a new image is made with, which keyslot changes are refused."""

from __future__ import annotations

from dataclasses import dataclass

from nbd_plugin.errors import ImageError


@dataclass(frozen=True)
class NewImage:
    """The volume's cipher and the PBKDF2 costs of its first keyslot and digest.

    ``iterations`` None means calibrated to take ``iter_time_ms`` here (as cryptsetup does).
    Format-specific choices (LUKS2's sector size, argon2 costs, label) travel as keywords.
    """

    cipher: str = "aes"
    mode: str = "xts-plain64"
    key_bytes: int = 64
    hash_spec: str = "sha256"
    iterations: int | None = None
    iter_time_ms: int = 2000


def check_removable(index: int, openable: int, allow_last: bool) -> None:
    """Refuse to remove keyslot ``index`` when it is the last of ``openable`` ones."""
    if openable == 1 and not allow_last:
        raise ImageError(
            f"keyslot {index} is the last one: removing it makes the data "
            "unrecoverable (use `vmshield image erase --method crypto` to destroy "
            "the image on purpose)"
        )
