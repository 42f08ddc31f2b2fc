"""numba kernels: a whole XTS or CBC request in one compiled call that holds no GIL.

A kernel is called as ``kernel(state, src, dst)``: ``state`` is the prepared context of one
cipher, one direction and one request at a time (a uint64 array: libcrypto's function and
context addresses, the sector geometry, this request's first IV, then the kernel's scratch;
see ``layout``); ``src`` and ``dst`` are the buffers as they come, 1-D byte memoryviews
(``dst`` may be ``src``). So a request makes no numpy view, and numba's dispatcher types
three arguments, not nine.

- ``xts_sectors`` (sectors of 4096 bytes and more): OpenSSL's own AES-XTS once per sector,
  ``EVP_CipherInit_ex`` with the sector's IV then ``EVP_CipherUpdate`` of the whole sector,
  on an XTS context keyed once (``libcrypto.XtsContext``).
- ``xts_vaes`` (sectors of a multiple of 256 bytes, on a CPU with VAES and AVX-512): the
  whole request in compiled code on the vector AES instructions (``vaes``), the round keys in
  the state, no libcrypto call at all.
- ``xts`` (512-byte sectors, where it is faster): per chunk of at most the scratch's capacity,
  one ECB call under K2 turns the sector numbers into the tweaks ``T_j``; block i of sector j
  is ``E_K1(P xor T_j alpha^i) xor T_j alpha^i`` with ``alpha`` doubling in GF(2^128)
  (``x^128 = x^7 + x^2 + x + 1``) block after block; the data goes through one ECB call
  under K1 between the two XORs. It also serves keys whose halves are equal, which OpenSSL's
  XTS refuses (IEEE 1619's vector 1 has them).
- ``cbc``: decryption is one ECB call per chunk and XORs with the previous ciphertext block
  (backwards, so it works in place); encryption is sequential inside a sector, so it runs
  block column by block column, one ECB call for block b of every sector of the chunk.

libcrypto is called through addresses held in ``state`` (so numba can cache the machine code
on disk). A kernel returns 0, or -1 if libcrypto reported a failure. Compiled with explicit
signatures on first use (``xts_kernel()``...), i.e. when the first cipher is made at server
start, never during a request.
"""

from __future__ import annotations

import threading
from typing import Any

import numba.extending
import numpy as np
import numpy.typing as npt
from llvmlite import ir

from nbd_plugin.crypto import vaes
from nbd_plugin.crypto.layout import (
    CTX_A,
    CTX_B,
    ENCRYPT,
    HEAD,
    INIT,
    IV,
    MASK,
    ROUNDS,
    STEP,
    UPDATE,
    WORDS,
)
from nbd_plugin.crypto.libcrypto import update_address

# numba's own annotations do not describe compiled calls; its decorators are used as untyped.
njit: Any = numba.njit
types: Any = numba.types
carray: Any = getattr(numba, "carray")  # noqa: B009 (not in numba's __all__)

U64 = npt.NDArray[np.uint64]
ONE = np.uint64(1)
TOP = np.uint64(63)
POLY = np.uint64(0x87)
ZERO = np.uint64(0)


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


def _init_typer(typingctx: Any, fn: Any, ctx: Any, iv: Any) -> Any:
    """``EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1)`` through the address ``fn``: a new
    IV, the same key and direction."""
    u64 = types.uint64
    sig = types.int32(u64, u64, u64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64, i32 = ir.IntType(64), ir.IntType(32)
        fnty = ir.FunctionType(i32, [i64, i64, i64, i64, i64, i32])
        target = builder.inttoptr(args[0], fnty.as_pointer())
        null = ir.Constant(i64, 0)
        return builder.call(target, [args[1], null, null, null, args[2], ir.Constant(i32, -1)])

    return sig, codegen


_init: Any = numba.extending.intrinsic(_init_typer)


def _address_typer(typingctx: Any, buf: Any) -> Any:
    """The address of an array's or a memoryview's first byte."""
    sig = types.uint64(buf)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, ir.IntType(64))

    return sig, codegen


_address: Any = numba.extending.intrinsic(_address_typer)


def _words_typer(typingctx: Any, buf: Any) -> Any:
    """A byte buffer's data as a ``uint64 *`` (for ``carray``)."""
    sig = types.CPointer(types.uint64)(buf)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.bitcast(ary.data, ir.IntType(64).as_pointer())

    return sig, codegen


_words: Any = numba.extending.intrinsic(_words_typer)


def _capacity(state: U64, words: int) -> int:
    """Sectors of ``words`` uint64 words that one chunk of this state's scratch holds."""
    return int((state.size - HEAD) // (words + 2))


capacity: Any = njit(inline="always")(_capacity)


def _sector_ivs(ivs: U64, m: int, first: np.uint64, step: np.uint64, mask: np.uint64) -> None:
    for j in range(m):
        ivs[2 * j] = (first + np.uint64(j) * step) & mask
        ivs[2 * j + 1] = ZERO


_ivs: Any = njit(inline="always")(_sector_ivs)


def _xts_sectors(state: U64, src: Any, dst: Any) -> int:
    update, init, ctx = state[UPDATE], state[INIT], state[CTX_A]
    nbytes = int(state[WORDS]) * 8
    size = np.uint64(nbytes)
    step, iv = state[STEP], state[IV]
    outl = _address(state)
    iv_at = outl + np.uint64(8 * HEAD)
    src_at, dst_at = _address(src), _address(dst)
    state[HEAD + 1] = ZERO
    for j in range(len(src) // nbytes):
        state[HEAD] = iv + np.uint64(j) * step  # plain64: wraps mod 2^64
        if _init(init, ctx, iv_at) != 1:
            return -1
        at = np.uint64(j) * size
        if _update(update, ctx, dst_at + at, outl, src_at + at, nbytes) != 1:
            return -1
    return 0


_vaes_request: Any = vaes.request_intrinsic()


def _xts_vaes(state: U64, src: Any, dst: Any) -> int:
    nbytes = int(state[WORDS]) * 8
    keys = _address(state) + np.uint64(8 * HEAD)
    _vaes_request(
        keys, keys + np.uint64(8 * vaes.DATA_KEY_WORDS), int(state[ROUNDS]), state[IV],
        state[STEP], _address(src), _address(dst), len(src) // nbytes,
        nbytes // vaes.STEP_BYTES, int(state[ENCRYPT] == ZERO),
    )  # fmt: skip
    return 0


def _xts(state: U64, src_bytes: Any, dst_bytes: Any) -> int:
    update, tweak_ctx, data_ctx = state[UPDATE], state[CTX_A], state[CTX_B]
    words = int(state[WORDS])
    iv_step = state[STEP]
    src = carray(_words(src_bytes), len(src_bytes) // 8)
    dst = carray(_words(dst_bytes), len(dst_bytes) // 8)
    cap = capacity(state, words)
    outl = _address(state)
    ivs = state[HEAD : HEAD + 2 * cap]
    ivs_at = _address(ivs)
    tw = state[HEAD + 2 * cap :]
    dst_at = _address(dst)
    sectors = src.size // words
    done = 0
    while done < sectors:
        m = min(cap, sectors - done)
        _ivs(ivs, m, state[IV] + np.uint64(done) * iv_step, iv_step, ~ZERO)
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
    at = _address(ivs)
    return bool(_update(update, iv_ctx, at, outl, at, 16 * m) == 1)


_cbc_ivs: Any = njit(_cbc_sector_ivs)


def _cbc(state: U64, src_bytes: Any, dst_bytes: Any) -> int:
    update, iv_ctx, data_ctx = state[UPDATE], state[CTX_A], state[CTX_B]
    words = int(state[WORDS])
    iv_step, iv_mask, encrypt = state[STEP], state[MASK], state[ENCRYPT]
    src = carray(_words(src_bytes), len(src_bytes) // 8)
    dst = carray(_words(dst_bytes), len(dst_bytes) // 8)
    cap = capacity(state, words)
    outl = _address(state)
    ivs = state[HEAD : HEAD + 2 * cap]  # encrypt: the IVs, then each column's ciphertext
    ivs_at = _address(ivs)
    plain = state[HEAD + 2 * cap :]
    plain_at = _address(plain)
    src_at = _address(src)
    sectors = src.size // words
    done = 0
    while done < sectors:
        m = min(cap, sectors - done)
        first = state[IV] + np.uint64(done) * iv_step
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


_STATE = types.Array(types.uint64, 1, "C")
_BYTES = types.MemoryView(types.uint8, 1, "C")
_READONLY = types.MemoryView(types.uint8, 1, "C", readonly=True)
SIGNATURES = [types.int64(_STATE, src, _BYTES) for src in (_BYTES, _READONLY)]
"""``kernel(state, src, dst)``: ``src`` writable or read-only (nbdkit's write buffer)."""

_compile_lock = threading.Lock()
_compiled: dict[str, Any] = {}
_cache = False
"""Off until ``jit`` has chosen the private cache directory named after the kernels' sources:
numba's default (``__pycache__`` next to this file, checked against this file's stamp only)
would run stale machine code after a change to ``vaes.py`` or ``layout.py``."""


def set_cache(enabled: bool) -> None:
    """Whether kernels compiled from now on are cached on disk (``jit`` decides)."""
    global _cache
    _cache = enabled


def _compiled_kernel(name: str, pyfunc: Any) -> Any:
    with _compile_lock:
        kernel = _compiled.get(name)
        if kernel is None:
            kernel = _compiled[name] = njit(SIGNATURES, nogil=True, cache=_cache)(pyfunc)
        return kernel


def xts_kernel() -> Any:
    """The XTS kernel of tweaks and AES-ECB (512-byte sectors, equal key halves)."""
    return _compiled_kernel("xts", _xts)


def xts_sectors_kernel() -> Any:
    """The XTS kernel that calls OpenSSL's XTS once per sector (4096-byte sectors)."""
    return _compiled_kernel("xts_sectors", _xts_sectors)


def xts_vaes_kernel() -> Any:
    """The XTS kernel on the CPU's vector AES instructions (only where ``vaes.unavailable()``
    is None: elsewhere LLVM cannot select them)."""
    return _compiled_kernel("xts_vaes", _xts_vaes)


def cbc_kernel() -> Any:
    """The CBC kernel; ``state[CTX_A]`` 0 means no ESSIV, ``state[ENCRYPT]`` 1 or 0."""
    return _compiled_kernel("cbc", _cbc)


__all__ = [
    "HEAD",
    "capacity",
    "cbc_kernel",
    "set_cache",
    "update_address",
    "xts_kernel",
    "xts_sectors_kernel",
    "xts_vaes_kernel",
]
