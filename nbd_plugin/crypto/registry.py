"""The open cipher interface: LUKS cipher specs -> sector ciphers.

A LUKS header names a cipher ("aes") and a mode ("xts-plain64", "cbc-essiv:sha256"). Adding an
algorithm is one factory registered here. A sector cipher works on whole sectors:

    encrypt(src, dst, first_iv) / decrypt(src, dst, first_iv)

``first_iv`` is the IV number of the first sector; successive sectors add ``iv_step`` (1 for
512-byte sectors; for LUKS2 4096-byte sectors without iv_large_sectors it is 8, because
dm-crypt counts IVs in 512-byte units). ``dst`` may be ``src`` when it is writable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from nbd_plugin.crypto import jit
from nbd_plugin.crypto.cbc import CbcCipher
from nbd_plugin.crypto.jit_cipher import JitCipher, SelfCheckFailed, jitted, xts_kernel_for
from nbd_plugin.crypto.xts import XtsCipher
from nbd_plugin.errors import UnsupportedError


class SectorCipher(Protocol):
    """A cipher that encrypts and decrypts runs of whole sectors."""

    sector_size: int

    @property
    def kernel_name(self) -> str:
        """What runs the data: "numpy", or the numba kernel ("vaes-xts", "openssl-xts",
        "aes-ecb")."""
        ...

    def encrypt(self, src: Any, dst: Any, first_iv: int) -> None: ...

    def decrypt(self, src: Any, dst: Any, first_iv: int) -> None: ...


Factory = Callable[[bytes, str, int, int], SectorCipher]
"""(key, iv_mode, sector_size, iv_step) -> cipher."""

_REGISTRY: dict[tuple[str, str], Factory] = {}
_KEY_SIZES: dict[tuple[str, str], tuple[int, ...]] = {}


def register(cipher: str, chain: str, key_sizes: tuple[int, ...]) -> Callable[[Factory], Factory]:
    """Register a factory for ``cipher-chain-*`` specs, e.g. ("aes", "xts")."""

    def decorate(factory: Factory) -> Factory:
        _REGISTRY[(cipher, chain)] = factory
        _KEY_SIZES[(cipher, chain)] = key_sizes
        return factory

    return decorate


@register("aes", "xts", (32, 64))
def _aes_xts(key: bytes, iv_mode: str, sector_size: int, iv_step: int) -> SectorCipher:
    if iv_mode not in ("plain64", "plain"):
        raise UnsupportedError(f"aes-xts with IV mode {iv_mode!r} is not supported")
    if iv_mode == "plain":
        raise UnsupportedError("aes-xts-plain (32-bit IVs) is not supported; use xts-plain64")
    return jitted(  # type: ignore[no-any-return]
        lambda: _numba_xts(key, sector_size, iv_step),
        lambda: XtsCipher(key, sector_size, iv_step),
    )


def _numba_xts(key: bytes, sector_size: int, iv_step: int) -> JitCipher:
    from nbd_plugin.crypto import vaes
    from nbd_plugin.crypto.xts_native import JitXts  # imports numba: only on that data path

    cipher = JitXts(key, sector_size, iv_step)
    if cipher.kernel_name == "vaes-xts":
        try:
            cipher.self_check(XtsCipher(key, sector_size, iv_step))
        except SelfCheckFailed as exc:  # OpenSSL's XTS serves, as on a CPU without VAES
            vaes.refuse(f"the VAES kernel failed its self-check ({exc})")
            cipher = JitXts(key, sector_size, iv_step)
    return cipher


@register("aes", "cbc", (16, 24, 32))
def _aes_cbc(key: bytes, iv_mode: str, sector_size: int, iv_step: int) -> SectorCipher:
    try:
        return jitted(  # type: ignore[no-any-return]
            lambda: _numba_cbc(key, iv_mode, sector_size, iv_step),
            lambda: CbcCipher(key, iv_mode, sector_size, iv_step),
        )
    except ValueError as exc:
        raise UnsupportedError(f"aes-cbc: {exc}") from None


def _numba_cbc(key: bytes, iv_mode: str, sector_size: int, iv_step: int) -> JitCipher:
    from nbd_plugin.crypto.cbc_native import JitCbc  # imports numba: only on that data path

    return JitCbc(key, iv_mode, sector_size, iv_step)


def split_mode(mode: str) -> tuple[str, str]:
    """ "xts-plain64" -> ("xts", "plain64"); "cbc-essiv:sha256" -> ("cbc", "essiv:sha256")."""
    chain, _, iv_mode = mode.partition("-")
    return chain, iv_mode or "plain"


def check_supported(cipher: str, mode: str, key_bytes: int) -> None:
    """Raise UnsupportedError unless ``cipher``/``mode`` with this key size can be served."""
    chain, _ = split_mode(mode)
    sizes = _KEY_SIZES.get((cipher, chain))
    if sizes is None:
        known = ", ".join(f"{c}-{m}" for c, m in sorted(_REGISTRY))
        raise UnsupportedError(f"cipher {cipher}-{mode} is not supported (supported: {known})")
    if key_bytes not in sizes:
        raise UnsupportedError(
            f"cipher {cipher}-{mode} with a {key_bytes * 8}-bit key is not supported "
            f"(supported: {', '.join(str(s * 8) for s in sizes)} bits)"
        )


def make_cipher(
    cipher: str, mode: str, key: bytes, sector_size: int = 512, iv_step: int = 1
) -> SectorCipher:
    """A sector cipher for LUKS ``cipher`` and ``mode`` with this master key."""
    check_supported(cipher, mode, len(key))
    chain, iv_mode = split_mode(mode)
    return _REGISTRY[(cipher, chain)](key, iv_mode, sector_size, iv_step)


def kernel_for(cipher: str, mode: str, sector_size: int) -> str:
    """What en/decrypts an image of this cipher and sector size in this process: "numpy" on
    the numpy path; on the numba path "vaes-xts" (the CPU's vector AES), "openssl-xts"
    (OpenSSL's XTS per sector) or "aes-ecb" (tweaks or CBC chains around AES-ECB). Waits for
    the data path to be decided."""
    if jit.data_path() != "numba":
        return "numpy"
    chain, _ = split_mode(mode)
    if (cipher, chain) == ("aes", "xts"):
        return xts_kernel_for(sector_size)
    return "aes-ecb"


def supported() -> list[str]:
    """The cipher-chain pairs available, for error messages and --help."""
    return [f"{c}-{m}" for c, m in sorted(_REGISTRY)]
