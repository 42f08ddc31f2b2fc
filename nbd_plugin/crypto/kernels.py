"""numba kernels: a whole XTS or CBC request in one compiled call that holds no GIL.

Each kernel comes as three calls (``Kernels``):

- ``run(state, src, dst, iv)``: whole sectors from ``src`` to ``dst`` (may be ``src``), the
  first sector's IV ``iv``;
- ``read(state, dst, fd, at, stride, iv)``: pread ``len(dst)`` bytes of the image at ``at``,
  then decrypt them in place: a 4 KiB read is one call instead of three Python calls
  (``os.preadv``, the hole check, the cipher);
- ``write(state, src, out, fd, at, iv)``: encrypt into ``out`` and pwrite it.

``state`` is the prepared context of one cipher and one direction (a uint64 array: libcrypto's
and libc's function addresses, context addresses, the sector geometry, then the kernel's
scratch; see ``layout``); the buffers are 1-D byte memoryviews as they come. A failed
pread/pwrite returns ``OS_ERROR - errno`` (the caller raises OSError at once: a one-time EIO
must reach the disk's sticky error), EINTR is retried; the end of the file returns ``SHORT``
(the caller reads again and says where). The crypto layer thus reads and writes descriptors its
callers own; it never opens a file.

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

libcrypto and libc are called through addresses held in ``state`` (so numba can cache the
machine code on disk). A kernel returns 0, or a status of ``layout`` (``FAILED`` if libcrypto
reported a failure). Compiled with explicit signatures on first use (``xts_kernel()``...),
i.e. when the first cipher is made at server start, never during a request; ``jit_cipher``
calls the compiled functions without numba's type dispatch (``Kernels.entries``).
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numba.extending
import numpy as np
import numpy.typing as npt
from llvmlite import ir

from nbd_plugin.crypto import vaes
from nbd_plugin.crypto.layout import (
    CTX_A,
    CTX_B,
    ENCRYPT,
    ERRNO,
    FAULTED,
    HEAD,
    INIT,
    MASK,
    OS_ERROR,
    PREAD,
    PWRITE,
    ROUNDS,
    SHORT,
    STEP,
    UPDATE,
    WORDS,
    ZERO_HEAD,
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


def _file_io_typer(typingctx: Any, fn: Any, fd: Any, buf: Any, count: Any, at: Any) -> Any:
    """``pread(fd, buf, count, at)`` or ``pwrite(...)`` (the same prototype) through the
    address ``fn``: the bytes moved, or -1 (errno stays in the thread's errno)."""
    sig = types.int64(types.uint64, types.int64, types.uint64, types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64, i32 = ir.IntType(64), ir.IntType(32)
        fnty = ir.FunctionType(i64, [i32, i64, i64, i64])
        target = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(target, [builder.trunc(args[1], i32), args[2], args[3], args[4]])

    return sig, codegen


_file_io: Any = numba.extending.intrinsic(_file_io_typer)


def _errno_typer(typingctx: Any, fn: Any) -> Any:
    """This thread's errno, through the address ``fn`` of libc's ``__errno_location``."""
    sig = types.int64(types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(i32.as_pointer(), [])
        where = builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [])
        return builder.sext(builder.load(where), ir.IntType(64))

    return sig, codegen


_errno: Any = numba.extending.intrinsic(_errno_typer)


def _fault_word_typer(typingctx: Any, guard: Any) -> Any:
    """``guard[0]``, loaded anew at this point (an atomic acquire load): a signal handler may
    have set it during the code before, which the compiler cannot know."""
    sig = types.uint64(guard)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        builder.fence("seq_cst")  # no read of the mapping before it moves past this load
        return builder.load_atomic(ary.data, "acquire", 8)

    return sig, codegen


_fault_word: Any = numba.extending.intrinsic(_fault_word_typer)
EINTR = 4


def _capacity(state: U64, words: int) -> int:
    """Sectors of ``words`` uint64 words that one chunk of this state's scratch holds."""
    return int((state.size - HEAD) // (words + 2))


capacity: Any = njit(inline="always")(_capacity)


def _sector_ivs(ivs: U64, m: int, first: np.uint64, step: np.uint64, mask: np.uint64) -> None:
    for j in range(m):
        ivs[2 * j] = (first + np.uint64(j) * step) & mask
        ivs[2 * j + 1] = ZERO


_ivs: Any = njit(inline="always")(_sector_ivs)


def _xts_sectors(state: U64, src: Any, dst: Any, iv: np.uint64) -> int:
    update, init, ctx = state[UPDATE], state[INIT], state[CTX_A]
    nbytes = int(state[WORDS]) * 8
    size = np.uint64(nbytes)
    step = state[STEP]
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


def _xts_vaes(state: U64, src: Any, dst: Any, iv: np.uint64) -> int:
    nbytes = int(state[WORDS]) * 8
    keys = _address(state) + np.uint64(8 * HEAD)
    _vaes_request(
        keys, keys + np.uint64(8 * vaes.DATA_KEY_WORDS), int(state[ROUNDS]), iv,
        state[STEP], _address(src), _address(dst), len(src) // nbytes,
        nbytes // vaes.STEP_BYTES, int(state[ENCRYPT] == ZERO),
    )  # fmt: skip
    return 0


def _xts(state: U64, src_bytes: Any, dst_bytes: Any, iv: np.uint64) -> int:
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
        _ivs(ivs, m, iv + np.uint64(done) * iv_step, iv_step, ~ZERO)
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


def _cbc(state: U64, src_bytes: Any, dst_bytes: Any, iv: np.uint64) -> int:
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
        first = iv + np.uint64(done) * iv_step
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


def _read_file(state: U64, dst: Any, fd: int, at: int, stride: int) -> int:
    """pread ``len(dst)`` bytes of ``fd`` at ``at`` into ``dst``: 0; ``ZERO_HEAD`` if one of
    every ``stride`` uint64 words (0: none checked) is zero, i.e. a hole may be there;
    ``SHORT`` if the file ended (the caller reads again and reports where); or
    ``OS_ERROR - errno`` if pread failed (EINTR is retried, as Python does)."""
    n = len(dst)
    to = _address(dst)
    done = 0
    while done < n:
        got = _file_io(state[PREAD], fd, to + np.uint64(done), n - done, at + done)
        if got < 0:
            errno = _errno(state[ERRNO])
            if errno == EINTR:
                continue
            return OS_ERROR - errno  # type: ignore[no-any-return]
        if got == 0:
            return SHORT
        done += got
    if stride > 0:
        words = carray(_words(dst), n // 8)
        for i in range(0, n // 8, stride):
            if words[i] == ZERO:
                return ZERO_HEAD
    return 0


def _write_file(state: U64, src: Any, n: int, fd: int, at: int) -> int:
    """pwrite the first ``n`` bytes of ``src`` to ``fd`` at ``at``: 0, ``SHORT`` if pwrite
    wrote nothing (the caller writes them again), or ``OS_ERROR - errno`` if it failed."""
    frm = _address(src)
    done = 0
    while done < n:
        put = _file_io(state[PWRITE], fd, frm + np.uint64(done), n - done, at + done)
        if put < 0:
            errno = _errno(state[ERRNO])
            if errno == EINTR:
                continue
            return OS_ERROR - errno  # type: ignore[no-any-return]
        if put == 0:
            return SHORT
        done += put
    return 0


_pread: Any = njit(inline="always")(_read_file)
_pwrite: Any = njit(inline="always")(_write_file)
# Each kernel below as a body of the fused calls: read then decrypt in place, or encrypt into
# ``out`` then write it (one dispatch, no GIL, for what cost three Python calls). The eight
# are written out rather than made by a factory: numba keys the on-disk cache of a closure
# by its pickled cells, and a pickled dispatcher differs from one process to the next.
_xts_body, _sectors_body, _vaes_body, _cbc_body = (
    njit(inline="always")(fn) for fn in (_xts, _xts_sectors, _xts_vaes, _cbc)
)


def _xts_read(state: U64, dst: Any, fd: int, at: int, stride: int, iv: np.uint64) -> int:
    status = _pread(state, dst, fd, at, stride)
    return status if status else _xts_body(state, dst, dst, iv)  # type: ignore[no-any-return]


def _xts_write(state: U64, src: Any, out: Any, fd: int, at: int, iv: np.uint64) -> int:
    status = _xts_body(state, src, out, iv)
    return status if status else _pwrite(state, out, len(src), fd, at)  # type: ignore[no-any-return]


def _xts_sectors_read(state: U64, dst: Any, fd: int, at: int, stride: int, iv: np.uint64) -> int:
    status = _pread(state, dst, fd, at, stride)
    return status if status else _sectors_body(state, dst, dst, iv)  # type: ignore[no-any-return]


def _xts_sectors_write(state: U64, src: Any, out: Any, fd: int, at: int, iv: np.uint64) -> int:
    status = _sectors_body(state, src, out, iv)
    return status if status else _pwrite(state, out, len(src), fd, at)  # type: ignore[no-any-return]


def _xts_vaes_read(state: U64, dst: Any, fd: int, at: int, stride: int, iv: np.uint64) -> int:
    status = _pread(state, dst, fd, at, stride)
    return status if status else _vaes_body(state, dst, dst, iv)  # type: ignore[no-any-return]


def _xts_vaes_write(state: U64, src: Any, out: Any, fd: int, at: int, iv: np.uint64) -> int:
    status = _vaes_body(state, src, out, iv)
    return status if status else _pwrite(state, out, len(src), fd, at)  # type: ignore[no-any-return]


def _cbc_read(state: U64, dst: Any, fd: int, at: int, stride: int, iv: np.uint64) -> int:
    status = _pread(state, dst, fd, at, stride)
    return status if status else _cbc_body(state, dst, dst, iv)  # type: ignore[no-any-return]


def _cbc_write(state: U64, src: Any, out: Any, fd: int, at: int, iv: np.uint64) -> int:
    status = _cbc_body(state, src, out, iv)
    return status if status else _pwrite(state, out, len(src), fd, at)  # type: ignore[no-any-return]


def _zero_words(state: U64, image: Any, at: int, n: int, stride: int) -> int:
    """``ZERO_HEAD`` if one of every ``stride`` words of ``n`` mapped bytes at ``at`` is zero
    (a hole may be there), or the last word of a sector is (the image was cut short inside
    that sector: the page cache zeroes the rest of the page past the end, and no fault
    says so), else 0."""
    words = carray(_words(image[at:]), n // 8)
    if stride > 0:
        for i in range(0, n // 8, stride):
            if words[i] == ZERO:
                return ZERO_HEAD
    sector = int(state[WORDS])
    for i in range(sector - 1, n // 8, sector):
        if words[i] == ZERO:
            return ZERO_HEAD
    return 0


_zeros: Any = njit(inline="always")(_zero_words)


def _mapped_source(state: U64, image: Any, guard: Any, at: int, n: int, stride: int) -> int:
    """Whether ``n`` bytes of the mapped ``image`` at ``at`` can be decrypted from there: 0,
    ``SHORT`` past the mapping, ``FAULTED`` if a page of it faulted, else ``_zero_words``."""
    if at < 0 or n > image.size - at:
        return SHORT
    if _fault_word(guard) != ZERO:
        return FAULTED
    return _zeros(state, image, at, n, stride)  # type: ignore[no-any-return]


def _mapped_result(state: U64, image: Any, guard: Any, at: int, n: int, stride: int,
                   status: int) -> int:  # fmt: skip
    """What a mapped read that returned ``status`` returns: the check again, for a hole
    punched (a trim) or a cut made between the first check and the decryption, which would
    have decrypted zeros; then ``FAULTED`` if a page faulted meanwhile."""
    if status == 0:
        status = _zeros(state, image, at, n, stride)
    return FAULTED if _fault_word(guard) != ZERO else status


_mapped_check: Any = njit(inline="always")(_mapped_source)
_mapped_done: Any = njit(inline="always")(_mapped_result)
# ``mapped(state, dst, image, guard, at, stride, iv)``: decrypt ``len(dst)`` bytes of the
# mapped payload ``image`` from index ``at`` into ``dst`` (``crypto/mapped``): the ciphertext
# is read where the page cache holds it, no pread. A page that faulted while we read (the
# guard set ``guard[0]``) makes the result ``FAULTED``: the bytes in ``dst`` are not used.
# Written out per kernel like the fused calls above, for the same reason (numba's cache).


def _xts_mapped(state: U64, dst: Any, image: Any, guard: Any, at: int, stride: int,
                iv: np.uint64) -> int:  # fmt: skip
    n = len(dst)
    status = _mapped_check(state, image, guard, at, n, stride)
    if status == 0:
        status = _xts_body(state, image[at : at + n], dst, iv)
    return _mapped_done(state, image, guard, at, n, stride, status)  # type: ignore[no-any-return]


def _xts_sectors_mapped(state: U64, dst: Any, image: Any, guard: Any, at: int, stride: int,
                        iv: np.uint64) -> int:  # fmt: skip
    n = len(dst)
    status = _mapped_check(state, image, guard, at, n, stride)
    if status == 0:
        status = _sectors_body(state, image[at : at + n], dst, iv)
    return _mapped_done(state, image, guard, at, n, stride, status)  # type: ignore[no-any-return]


def _xts_vaes_mapped(state: U64, dst: Any, image: Any, guard: Any, at: int, stride: int,
                     iv: np.uint64) -> int:  # fmt: skip
    n = len(dst)
    status = _mapped_check(state, image, guard, at, n, stride)
    if status == 0:
        status = _vaes_body(state, image[at : at + n], dst, iv)
    return _mapped_done(state, image, guard, at, n, stride, status)  # type: ignore[no-any-return]


def _cbc_mapped(state: U64, dst: Any, image: Any, guard: Any, at: int, stride: int,
                iv: np.uint64) -> int:  # fmt: skip
    n = len(dst)
    status = _mapped_check(state, image, guard, at, n, stride)
    if status == 0:
        status = _cbc_body(state, image[at : at + n], dst, iv)
    return _mapped_done(state, image, guard, at, n, stride, status)  # type: ignore[no-any-return]


_FUSED: dict[str, tuple[Any, Any, Any, Any]] = {
    "xts": (_xts, _xts_read, _xts_write, _xts_mapped),
    "xts_sectors": (_xts_sectors, _xts_sectors_read, _xts_sectors_write, _xts_sectors_mapped),
    "xts_vaes": (_xts_vaes, _xts_vaes_read, _xts_vaes_write, _xts_vaes_mapped),
    "cbc": (_cbc, _cbc_read, _cbc_write, _cbc_mapped),
}


_STATE = types.Array(types.uint64, 1, "C")
_BYTES = types.MemoryView(types.uint8, 1, "C")
_READONLY = types.MemoryView(types.uint8, 1, "C", readonly=True)
_I64, _U64 = types.int64, types.uint64
SIGNATURES = [_I64(_STATE, src, _BYTES, _U64) for src in (_BYTES, _READONLY)]
"""``kernel(state, src, dst, iv)``: ``src`` writable or read-only (nbdkit's write buffer)."""
READ_SIGNATURES = [_I64(_STATE, _BYTES, _I64, _I64, _I64, _U64)]
"""``read(state, dst, fd, at, stride, iv)``: see ``Kernels.read``."""
WRITE_SIGNATURES = [_I64(_STATE, src, _BYTES, _I64, _I64, _U64) for src in (_BYTES, _READONLY)]
"""``write(state, src, out, fd, at, iv)``: see ``Kernels.write``."""
_IMAGE = types.Array(types.uint8, 1, "C", readonly=True)
MAPPED_SIGNATURES = [_I64(_STATE, _BYTES, _IMAGE, _STATE, _I64, _I64, _U64)]
"""``mapped(state, dst, image, guard, at, stride, iv)``: see ``Kernels.mapped``."""

_compile_lock = threading.Lock()
_compiled: dict[str, Kernels] = {}
_cache = False
"""Off until ``jit`` has chosen the private cache directory named after the kernels' sources:
numba's default (``__pycache__`` next to this file, checked against this file's stamp only)
would run stale machine code after a change to ``vaes.py`` or ``layout.py``."""


class Kernels(NamedTuple):
    """One kernel's three compiled calls (all hold no GIL and return 0 or a status of
    ``layout``: ``FAILED``, ``SHORT``, ``ZERO_HEAD``)."""

    run: Any
    """``run(state, src, dst, iv)``: whole sectors from ``src`` to ``dst`` (may be ``src``),
    the first sector's IV ``iv``."""
    read: Any
    """``read(state, dst, fd, at, stride, iv)``: pread into ``dst``, then decrypt it in
    place (``_read_file`` says what ``stride`` is)."""
    write: Any
    """``write(state, src, out, fd, at, iv)``: encrypt ``src`` into the start of ``out`` (as
    long or longer), then pwrite those ``len(src)`` bytes."""
    mapped: Any
    """``mapped(state, dst, image, guard, at, stride, iv)``: decrypt ``len(dst)`` bytes of
    the mapped payload (``crypto/mapped.ImageMap``: ``image``, ``guard``) from index ``at``
    into ``dst``."""

    def entries(self) -> Entries:
        """The compiled functions themselves, one per signature."""
        return Entries(
            _entry(self.run, _BYTES, _BYTES, _U64), _entry(self.run, _READONLY, _BYTES, _U64),
            _entry(self.read, _BYTES, _I64, _I64, _I64, _U64),
            _entry(self.write, _BYTES, _BYTES, _I64, _I64, _U64),
            _entry(self.write, _READONLY, _BYTES, _I64, _I64, _U64),
            _entry(self.mapped, _BYTES, _IMAGE, _STATE, _I64, _I64, _U64),
        )  # fmt: skip


def _entry(dispatcher: Any, *args: Any) -> Any:
    """``dispatcher``'s compiled function for ``(state, *args)``, called without numba's type
    dispatch (which costs 0.4-0.6 us of a 4 KiB request's ~1.5 here). It checks nothing: a
    buffer must be a C-contiguous 1-D byte memoryview, writable where the kernel writes
    (``jit_cipher`` checks before each call)."""
    return dispatcher.overloads[(_STATE, *args)].entry_point


class Entries(NamedTuple):
    """``Kernels``' compiled functions by signature (``Kernels.entries``)."""

    run: Any
    run_readonly: Any
    """``run`` with a read-only ``src`` (nbdkit's write buffer, bytes)."""
    read: Any
    write: Any
    write_readonly: Any
    mapped: Any


def set_cache(enabled: bool) -> None:
    """Whether kernels compiled from now on are cached on disk (``jit`` decides)."""
    global _cache
    _cache = enabled


def _compiled_kernel(name: str) -> Kernels:
    with _compile_lock:
        kernel = _compiled.get(name)
        if kernel is None:
            run, read, write, mapped = _FUSED[name]
            kernel = _compiled[name] = Kernels(*(
                njit(signatures, nogil=True, cache=_cache)(fn) for fn, signatures in (
                    (run, SIGNATURES), (read, READ_SIGNATURES), (write, WRITE_SIGNATURES),
                    (mapped, MAPPED_SIGNATURES))
            ))  # fmt: skip
        return kernel


def xts_kernel() -> Kernels:
    """The XTS kernel of tweaks and AES-ECB (512-byte sectors, equal key halves)."""
    return _compiled_kernel("xts")


def xts_sectors_kernel() -> Kernels:
    """The XTS kernel that calls OpenSSL's XTS once per sector (4096-byte sectors)."""
    return _compiled_kernel("xts_sectors")


def xts_vaes_kernel() -> Kernels:
    """The XTS kernel on the CPU's vector AES instructions (only where ``vaes.unavailable()``
    is None: elsewhere LLVM cannot select them)."""
    return _compiled_kernel("xts_vaes")


def cbc_kernel() -> Kernels:
    """The CBC kernel; ``state[CTX_A]`` 0 means no ESSIV, ``state[ENCRYPT]`` 1 or 0."""
    return _compiled_kernel("cbc")


__all__ = [
    "HEAD",
    "Kernels",
    "capacity",
    "cbc_kernel",
    "set_cache",
    "update_address",
    "xts_kernel",
    "xts_sectors_kernel",
    "xts_vaes_kernel",
]
