"""AES-XTS on the CPU's vector AES instructions (VAES on 512-bit registers), through numba.

OpenSSL 3.0 (Debian 12's libcrypto) runs XTS on 128-bit AES-NI: ~6.6 GB/s per core here at
4 KiB, ~5.5 GB/s once its per-sector set-up is paid (``EVP_CipherInit_ex`` for each sector's
IV), ~3 GB/s with 512-byte sectors. A core that has VAES and AVX-512 (AMD Zen 4, Intel Ice
Lake and later) runs four AES blocks per instruction; this module emits that loop as LLVM IR
from a numba intrinsic, so it is compiled with the rest of the kernels (no C of our own):

- ``xts_sector``: one data unit (a sector of a multiple of 256 bytes). The tweak
  ``T = AES-enc(K2, IV)`` with 128-bit AES-NI, then 16 blocks per step in four 512-bit
  registers: ``C = AES(K1, P xor T*a^i) xor T*a^i``, the four registers' tweaks made from the
  previous step's by multiplying each 128-bit lane by ``a^4`` in GF(2^128) (shifts and one
  carry-less reduction by ``x^7 + x^2 + x + 1``); every round of every block in flight is
  unrolled (AES-128: 10 rounds, AES-256: 14), the round keys in registers.
- The round keys are expanded here (FIPS-197) when a cipher is keyed, once per image: the
  data key's schedule for encryption, its equivalent inverse schedule for decryption
  (``aesdec`` wants InvMixColumns applied to the middle rounds), and the tweak key's. They live
  in the kernel's state array (``layout``), as OpenSSL's contexts hold theirs; the serving
  process keeps all its memory out of swap (``serve/hardening``). The expansion runs in
  Python and looks bytes up in the S-box by index, once per unlock; the per-block work is
  the CPU's AES instructions, which take constant time.

``unavailable()`` says why this kernel cannot run here (no VAES/AVX-512, or numba compiling
for a CPU other than this one, where the instructions could not be selected); the cipher then
runs on OpenSSL's XTS. Measured on this machine (Zen 4, 1 MiB requests, one core): 11-12 GB/s
in either direction against 5.5 GB/s for OpenSSL's XTS per 4096-byte sector
(docs/performance.md).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import numpy as np
import numpy.typing as npt

#: bytes per step of the block loop: four 512-bit registers of four AES blocks each
STEP_BYTES = 256
#: the rounds of AES-128 and AES-256 (XTS keys are two AES-128 or two AES-256 keys)
ROUNDS = (10, 14)
MAX_ROUNDS = 14
#: uint64 words of the data key's schedule, each round key repeated over 512 bits
DATA_KEY_WORDS = 8 * (MAX_ROUNDS + 1)
#: uint64 words of the tweak key's schedule (128 bits per round key)
TWEAK_KEY_WORDS = 2 * (MAX_ROUNDS + 1)
NEEDED = ("aes", "vaes", "avx512f")
_refused: str | None = None


def refuse(reason: str) -> None:
    """Stop choosing the VAES kernel in this process (it failed to compile or to check)."""
    global _refused
    _refused = reason


def unavailable() -> str | None:
    """Why the VAES kernel cannot run in this process, or None if it can."""
    return _refused or _unsupported()


@functools.cache
def _unsupported() -> str | None:
    try:
        import llvmlite.binding as llvm
        import numba
    except ImportError as exc:
        return f"numba is not importable ({exc})"
    config: Any = numba.config
    if config.CPU_NAME or config.CPU_FEATURES:
        return "numba compiles for a named CPU (NUMBA_CPU_NAME/NUMBA_CPU_FEATURES), not this one"
    features = llvm.get_host_cpu_features()
    missing = [f for f in NEEDED if not features.get(f, False)]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


# ---- the key schedule (FIPS-197, 5.2) ----------------------------------------------------
def _xtime(b: int) -> int:
    return ((b << 1) ^ (0x1B if b & 0x80 else 0)) & 0xFF


def _gmul(a: int, b: int) -> int:
    product = 0
    while b:
        if b & 1:
            product ^= a
        a = _xtime(a)
        b >>= 1
    return product


def _make_sbox() -> bytes:
    """The AES S-box: the inverse in GF(2^8) (through powers of the generator 3), then the
    affine map (FIPS-197, 5.1.1)."""
    exp, log = [0] * 255, [0] * 256
    x = 1
    for i in range(255):
        exp[i], log[x] = x, i
        x ^= _xtime(x)  # times 3
    box = bytearray(256)
    for x in range(256):
        inv = exp[(255 - log[x]) % 255] if x else 0
        s = inv
        for shift in range(1, 5):
            s ^= ((inv << shift) | (inv >> (8 - shift))) & 0xFF
        box[x] = s ^ 0x63
    return bytes(box)


SBOX = _make_sbox()


def round_keys(key: bytes) -> list[bytes]:
    """The encryption round keys of an AES-128 or AES-256 key, 16 bytes each."""
    if len(key) not in (16, 32):
        raise ValueError("AES-XTS halves are 128 or 256 bits")
    nk = len(key) // 4
    rounds = nk + 6
    words = [bytes(key[4 * i : 4 * i + 4]) for i in range(nk)]
    rcon = 1
    for i in range(nk, 4 * (rounds + 1)):
        t = words[i - 1]
        if i % nk == 0:
            t = bytes(SBOX[b] for b in t[1:] + t[:1])
            t = bytes([t[0] ^ rcon]) + t[1:]
            rcon = _xtime(rcon)
        elif nk > 6 and i % nk == 4:
            t = bytes(SBOX[b] for b in t)
        words.append(bytes(a ^ b for a, b in zip(words[i - nk], t, strict=True)))
    return [b"".join(words[4 * r : 4 * r + 4]) for r in range(rounds + 1)]


def _inv_mix_columns(block: bytes) -> bytes:
    out = bytearray(16)
    for c in range(0, 16, 4):
        a = block[c : c + 4]
        for i in range(4):
            out[c + i] = (
                _gmul(a[i], 14)
                ^ _gmul(a[(i + 1) % 4], 11)
                ^ _gmul(a[(i + 2) % 4], 13)
                ^ _gmul(a[(i + 3) % 4], 9)
            )
    return bytes(out)


def decryption_keys(encryption: list[bytes]) -> list[bytes]:
    """The equivalent inverse cipher's round keys (FIPS-197, 5.3.5), as ``aesdec`` takes them."""
    middle = [_inv_mix_columns(k) for k in reversed(encryption[1:-1])]
    return [encryption[-1], *middle, encryption[0]]


def fill_state(state: npt.NDArray[np.uint64], at: int, key: bytes, encrypt: bool) -> int:
    """Write the XTS key's schedules into ``state`` from word ``at``: the data half's (for
    this direction, each round key four times over 512 bits), then the tweak half's.
    Returns the number of rounds."""
    half = len(key) // 2
    data = round_keys(key[:half])
    if not encrypt:
        data = decryption_keys(data)
    tweak = round_keys(key[half:])
    wide = np.frombuffer(b"".join(k * 4 for k in data), dtype="<u8")
    state[at : at + wide.size] = wide
    narrow = np.frombuffer(b"".join(tweak), dtype="<u8")
    state[at + DATA_KEY_WORDS : at + DATA_KEY_WORDS + narrow.size] = narrow
    return len(data) - 1


# ---- the intrinsic -----------------------------------------------------------------------
def _emit_sector(context: Any, builder: Any, args: Any) -> Any:
    """LLVM IR of ``xts_sector`` (see the module docstring)."""
    from llvmlite import ir

    cgutils: Any = importlib.import_module("numba.core.cgutils")  # untyped helpers
    i64 = ir.IntType(64)
    v2, v8 = ir.VectorType(i64, 2), ir.VectorType(i64, 8)

    def aes(name: str, vt: Any, suffix: str, x: Any, k: Any) -> Any:
        fnty = ir.FunctionType(vt, [vt, vt])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.x86.aesni.{name}{suffix}")
        return builder.call(fn, [x, k])

    def times_alpha(v: Any, n: int) -> Any:
        """Each 128-bit lane (two i64: low, high) times a^n, 1 <= n <= 7, in GF(2^128)."""
        lanes = v.type.count
        vt = v.type

        def splat(c: int) -> Any:
            return ir.Constant(vt, [c] * lanes)

        up = builder.shl(v, splat(n))
        out = builder.lshr(v, splat(64 - n))  # the bits each word pushes out
        swap = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [i ^ 1 for i in range(lanes)])
        other = builder.shuffle_vector(out, out, swap)  # low word: the high word's, and back
        reduced = builder.xor(
            builder.xor(other, builder.shl(other, splat(1))),
            builder.xor(builder.shl(other, splat(2)), builder.shl(other, splat(7))),
        )
        low = ir.Constant(ir.VectorType(ir.IntType(1), lanes), [1, 0] * (lanes // 2))
        return builder.xor(up, builder.select(low, reduced, other))

    keys_at, tweak_keys_at, rounds, iv, src_at, dst_at, steps, decrypt = args
    p8, p2 = v8.as_pointer(), v2.as_pointer()
    keys = builder.inttoptr(keys_at, p8)
    tweak_keys = builder.inttoptr(tweak_keys_at, p2)
    src = builder.inttoptr(src_at, p8)
    dst = builder.inttoptr(dst_at, p8)

    def body(nr: int, mid: str, last: str) -> None:
        tk = [
            builder.load(builder.gep(tweak_keys, [ir.Constant(i64, r)]), align=8)
            for r in range(nr + 1)
        ]
        block = builder.insert_element(ir.Constant(v2, [0, 0]), iv, ir.Constant(i64, 0))
        t = builder.xor(block, tk[0])
        for r in range(1, nr):
            t = aes("aesenc", v2, "", t, tk[r])
        t = aes("aesenclast", v2, "", t, tk[nr])
        pair = ir.Constant(ir.VectorType(ir.IntType(32), 4), [0, 1, 2, 3])
        low = builder.shuffle_vector(t, times_alpha(t, 1), pair)
        high = builder.shuffle_vector(times_alpha(t, 2), times_alpha(t, 3), pair)
        tweaks = cgutils.alloca_once(builder, v8)
        every = ir.Constant(ir.VectorType(ir.IntType(32), 8), list(range(8)))
        builder.store(builder.shuffle_vector(low, high, every), tweaks)
        k = [builder.load(builder.gep(keys, [ir.Constant(i64, r)]), align=8) for r in range(nr + 1)]
        with cgutils.for_range(builder, steps) as loop:
            base = builder.mul(loop.index, ir.Constant(i64, 4))
            tw = [builder.load(tweaks)]
            for _ in range(4):
                tw.append(times_alpha(tw[-1], 4))
            builder.store(tw.pop(), tweaks)
            at = [builder.gep(src, [builder.add(base, ir.Constant(i64, j))]) for j in range(4)]
            xs = [
                builder.xor(builder.xor(builder.load(a, align=1), w), k[0])
                for a, w in zip(at, tw, strict=True)
            ]
            for r in range(1, nr):
                xs = [aes(mid, v8, ".512", x, k[r]) for x in xs]
            xs = [aes(last, v8, ".512", x, k[nr]) for x in xs]
            for j, (x, w) in enumerate(zip(xs, tw, strict=True)):
                out = builder.gep(dst, [builder.add(base, ir.Constant(i64, j))])
                builder.store(builder.xor(x, w), out, align=1)

    is_decrypt = builder.icmp_unsigned("!=", decrypt, ir.Constant(i64, 0))
    is_long = builder.icmp_unsigned("==", rounds, ir.Constant(i64, 14))
    with builder.if_else(is_decrypt) as (dec, enc):
        for branch, mid, last in ((dec, "aesdec", "aesdeclast"), (enc, "aesenc", "aesenclast")):
            with branch, builder.if_else(is_long) as (long_key, short_key):
                with long_key:
                    body(14, mid, last)
                with short_key:
                    body(10, mid, last)
    return context.get_dummy_value()


def _sector_typer(
    typingctx: Any, keys: Any, tweak_keys: Any, rounds: Any, iv: Any, src: Any, dst: Any,
    steps: Any, decrypt: Any,
) -> Any:  # fmt: skip
    """``xts_sector(keys, tweak_keys, rounds, iv, src, dst, steps, decrypt)``: addresses and
    counts as uint64/int64; ``steps`` = sector bytes / STEP_BYTES; rounds 10 or 14."""
    from numba import types

    u64, i64 = types.uint64, types.int64
    sig = types.void(u64, u64, i64, u64, u64, u64, i64, i64)

    def codegen(context: Any, builder: Any, signature: Any, values: Any) -> Any:
        return _emit_sector(context, builder, values)

    return sig, codegen


def sector_intrinsic() -> Any:
    """The numba intrinsic ``xts_sector`` (imports numba: call only on the numba path)."""
    import numba.extending

    return numba.extending.intrinsic(_sector_typer)
