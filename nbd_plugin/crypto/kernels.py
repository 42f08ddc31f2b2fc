"""numba kernels: a whole XTS or CBC request in one compiled call that holds no GIL.

Each kernel walks the request in chunks of at most ``scratch`` capacity sectors and, per
chunk, computes the sector IVs, calls libcrypto's ``EVP_CipherUpdate`` on keyed AES-ECB
contexts (``libcrypto.EcbContext``) through its address, and does the XORs. XTS (IEEE 1619)
per chunk: one ECB call under K2 turns the sector numbers into the tweaks ``T_j``; block i of
sector j is ``E_K1(P xor T_j alpha^i) xor T_j alpha^i``, with ``alpha`` doubling in
GF(2^128) (``x^128 = x^7 + x^2 + x + 1``) block after block; the data goes through one ECB
call under K1 between the two XORs. CBC decrypts with one ECB call and XORs with the previous
ciphertext block (backwards, so it works in place); CBC encryption is sequential inside a
sector, so it runs block column by block column, one ECB call for block b of every sector.

Everything is in place in ``dst`` (which may be ``src``); addresses travel as integers, the
function pointer as an argument (so numba can cache the machine code on disk). Arrays are
1-D uint64, whole sectors. A kernel returns 0, or -1 if libcrypto reported a failure.
Compiled with explicit signatures on first use (``xts_kernel()``, ``cbc_kernel()``), i.e.
when the first cipher is made at server start, never during a request.
"""

from __future__ import annotations

import threading
from typing import Any

import numba.extending
import numpy as np
import numpy.typing as npt
from llvmlite import ir

from nbd_plugin.crypto.libcrypto import update_address

# numba's own annotations do not describe compiled calls; its decorators are used as untyped.
njit: Any = numba.njit
types: Any = numba.types

U64 = npt.NDArray[np.uint64]
ONE = np.uint64(1)
TOP = np.uint64(63)
POLY = np.uint64(0x87)
ZERO = np.uint64(0)
OUTL = 0
"""Scratch layout, in uint64 words: [0] EVP's int outl, then 2 words of IV per sector of the
chunk, then the chunk's tweaks (XTS) or cipher output (CBC), ``words`` per sector."""
HEAD = 2


def _update_typer(
    typingctx: Any, fn: Any, ctx: Any, out: Any, outl: Any, src: Any, nbytes: Any
) -> Any:
    """``EVP_CipherUpdate(ctx, out, outl, src, nbytes)`` through the address ``fn``."""
    u64 = types.uint64
    sig = types.int32(u64, u64, u64, u64, u64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64, i32 = ir.IntType(64), ir.IntType(32)
        fnty = ir.FunctionType(i32, [i64, i64, i64, i64, i32])
        target = builder.inttoptr(args[0], fnty.as_pointer())
        inl = builder.trunc(args[5], i32)
        return builder.call(target, [args[1], args[2], args[3], args[4], inl])

    return sig, codegen


_update: Any = numba.extending.intrinsic(_update_typer)


def _capacity(scratch: U64, words: int) -> int:
    """Sectors of ``words`` uint64 words that one chunk of this scratch holds."""
    return int((scratch.size - HEAD) // (words + 2))


capacity: Any = njit(inline="always")(_capacity)


def _sector_ivs(ivs: U64, m: int, first: np.uint64, step: np.uint64, mask: np.uint64) -> None:
    for j in range(m):
        ivs[2 * j] = (first + np.uint64(j) * step) & mask
        ivs[2 * j + 1] = ZERO


_ivs: Any = njit(inline="always")(_sector_ivs)


def _xts(
    update: np.uint64,
    tweak_ctx: np.uint64,
    data_ctx: np.uint64,
    src: U64,
    dst: U64,
    words: int,
    first_iv: np.uint64,
    iv_step: np.uint64,
    scratch: U64,
) -> int:
    cap = capacity(scratch, words)
    outl = np.uint64(scratch.ctypes.data)
    ivs = scratch[HEAD : HEAD + 2 * cap]
    ivs_at = np.uint64(ivs.ctypes.data)
    tw = scratch[HEAD + 2 * cap :]
    dst_at = np.uint64(dst.ctypes.data)
    sectors = src.size // words
    done = 0
    while done < sectors:
        m = min(cap, sectors - done)
        _ivs(ivs, m, first_iv + np.uint64(done) * iv_step, iv_step, ~ZERO)
        if _update(update, tweak_ctx, ivs_at, outl, ivs_at, 16 * m) != 1:
            return -1
        base = done * words
        for j in range(m):
            lo = ivs[2 * j]
            hi = ivs[2 * j + 1]
            o = j * words
            for b in range(0, words, 2):
                tw[o + b] = lo
                tw[o + b + 1] = hi
                dst[base + o + b] = src[base + o + b] ^ lo
                dst[base + o + b + 1] = src[base + o + b + 1] ^ hi
                carry = hi >> TOP
                hi = (hi << ONE) | (lo >> TOP)
                lo = (lo << ONE) ^ (carry * POLY)
        n = m * words
        at = dst_at + np.uint64(8 * base)
        if _update(update, data_ctx, at, outl, at, 8 * n) != 1:
            return -1
        for k in range(n):
            dst[base + k] ^= tw[k]
        done += m
    return 0


def _cbc_sector_ivs(
    update: np.uint64, iv_ctx: np.uint64, outl: np.uint64, ivs: U64, m: int, first: np.uint64,
    step: np.uint64, mask: np.uint64,
) -> bool:  # fmt: skip
    """Sector IVs: the sector number (plain64, or 32 bits for plain), ESSIV-encrypted if
    ``iv_ctx`` is not 0."""
    _ivs(ivs, m, first, step, mask)
    if iv_ctx == ZERO:
        return True
    at = np.uint64(ivs.ctypes.data)
    return bool(_update(update, iv_ctx, at, outl, at, 16 * m) == 1)


_cbc_ivs: Any = njit(_cbc_sector_ivs)


def _cbc(
    update: np.uint64,
    iv_ctx: np.uint64,
    data_ctx: np.uint64,
    src: U64,
    dst: U64,
    words: int,
    first_iv: np.uint64,
    iv_step: np.uint64,
    iv_mask: np.uint64,
    encrypt: int,
    scratch: U64,
) -> int:
    cap = capacity(scratch, words)
    outl = np.uint64(scratch.ctypes.data)
    ivs = scratch[HEAD : HEAD + 2 * cap]  # encrypt: the IVs, then each column's ciphertext
    ivs_at = np.uint64(ivs.ctypes.data)
    plain = scratch[HEAD + 2 * cap :]
    plain_at = np.uint64(plain.ctypes.data)
    src_at = np.uint64(src.ctypes.data)
    sectors = src.size // words
    done = 0
    while done < sectors:
        m = min(cap, sectors - done)
        first = first_iv + np.uint64(done) * iv_step
        if not _cbc_ivs(update, iv_ctx, outl, ivs, m, first, iv_step, iv_mask):
            return -1
        base = done * words
        if encrypt:  # block column b of every sector in one ECB call
            for b in range(0, words, 2):
                for j in range(m):
                    o = base + j * words + b
                    ivs[2 * j] ^= src[o]
                    ivs[2 * j + 1] ^= src[o + 1]
                if _update(update, data_ctx, ivs_at, outl, ivs_at, 16 * m) != 1:
                    return -1
                for j in range(m):
                    o = base + j * words + b
                    dst[o] = ivs[2 * j]
                    dst[o + 1] = ivs[2 * j + 1]
        else:
            at = src_at + np.uint64(8 * base)
            if _update(update, data_ctx, plain_at, outl, at, 8 * m * words) != 1:
                return -1
            for j in range(m):
                o = base + j * words
                for b in range(words - 2, 0, -2):  # backwards: src may be dst
                    dst[o + b] = plain[j * words + b] ^ src[o + b - 2]
                    dst[o + b + 1] = plain[j * words + b + 1] ^ src[o + b - 1]
                dst[o] = plain[j * words] ^ ivs[2 * j]
                dst[o + 1] = plain[j * words + 1] ^ ivs[2 * j + 1]
        done += m
    return 0


_ARRAY = types.Array(types.uint64, 1, "C")
_READONLY = types.Array(types.uint64, 1, "C", readonly=True)
_U = types.uint64


def _signatures(*head: Any, tail: tuple[Any, ...]) -> list[Any]:
    """One signature for a writable ``src``, one for a read-only one (nbdkit's write buffer)."""
    return [types.int64(*head, src, _ARRAY, types.int64, *tail) for src in (_ARRAY, _READONLY)]


_compile_lock = threading.Lock()
_compiled: dict[str, Any] = {}
_cache = True


def set_cache(enabled: bool) -> None:
    """Whether kernels compiled from now on are cached on disk (``jit`` decides)."""
    global _cache
    _cache = enabled


def _compiled_kernel(name: str, pyfunc: Any, signatures: list[Any]) -> Any:
    with _compile_lock:
        kernel = _compiled.get(name)
        if kernel is None:
            kernel = _compiled[name] = njit(signatures, nogil=True, cache=_cache)(pyfunc)
        return kernel


def xts_kernel() -> Any:
    """``xts(update, tweak_ctx, data_ctx, src, dst, words, first_iv, iv_step, scratch)``."""
    sigs = _signatures(_U, _U, _U, tail=(_U, _U, _ARRAY))
    return _compiled_kernel("xts", _xts, sigs)


def cbc_kernel() -> Any:
    """``cbc(update, iv_ctx, data_ctx, src, dst, words, first_iv, iv_step, iv_mask, encrypt,
    scratch)``; ``iv_ctx`` 0 means no ESSIV, ``encrypt`` 1 or 0."""
    sigs = _signatures(_U, _U, _U, tail=(_U, _U, _U, types.int64, _ARRAY))
    return _compiled_kernel("cbc", _cbc, sigs)


__all__ = ["capacity", "cbc_kernel", "set_cache", "update_address", "xts_kernel"]
