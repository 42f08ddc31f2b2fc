"""AES-XTS on the CPU's vector AES instructions (VAES on 512-bit registers), through numba.

OpenSSL 3.0 (Debian 12's libcrypto) runs XTS on 128-bit AES-NI: ~6.6 GB/s per core here at
4 KiB, ~5.5 GB/s once its per-sector set-up is paid (``EVP_CipherInit_ex`` for each sector's
IV), ~3 GB/s with 512-byte sectors. A core that has VAES and AVX-512 (AMD Zen 4, Intel Ice
Lake and later) runs four AES blocks per instruction; this module emits that loop as LLVM IR
from a numba intrinsic, so it is compiled with the rest of the kernels (no C of our own):

- ``xts_request``: a whole request of data units (sectors of a multiple of 256 bytes). The
  tweaks ``T = AES-enc(K2, IV)`` of four sectors at once (one IV per 128-bit lane), then per
  sector 16 blocks per step in four 512-bit registers: ``C = AES(K1, P xor T*a^i) xor
  T*a^i``, the first register's tweaks ``T*a^0..a^3`` made from the sector's lane, each next
  register's by multiplying every 128-bit lane by ``a^4`` in GF(2^128) (shifts and one
  carry-less reduction by ``x^7 + x^2 + x + 1``); every round of the four registers
  interleaved and unrolled (AES-128: 10 rounds, AES-256: 14), the round keys in registers.
- The round keys are expanded here (FIPS-197) when a cipher is keyed, once per image: the
  data key's schedule for encryption, its equivalent inverse schedule for decryption
  (``aesdec`` wants InvMixColumns applied to the middle rounds), and the tweak key's. They live
  in the kernel's state array (``layout``), as OpenSSL's contexts hold theirs; the serving
  process keeps all its memory out of swap (``serve/hardening``). The expansion runs in
  Python and looks bytes up in the S-box by index, once per unlock; the per-block work is
  the CPU's AES instructions, which take constant time.

``unavailable()`` says why this kernel cannot run here (no VAES/AVX-512, or numba compiling
for a CPU other than this one, where the instructions could not be selected); the cipher then
runs on OpenSSL's XTS. Measured on this machine (Zen 4, one core, decrypting in place): 1 MiB
in 83 us with 4096-byte sectors (12.6 GB/s; OpenSSL's XTS per sector 176 us) and 98 us with
512-byte sectors (10.6 GB/s; 335 us); 64 KiB in 6.1 and 7.1 us (docs/performance.md).
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
#: uint64 words of the tweak key's schedule (also repeated: four sectors' tweaks at once)
TWEAK_KEY_WORDS = 8 * (MAX_ROUNDS + 1)
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
    """Write the XTS key's schedules into ``state`` from word ``at``, each round key four
    times over 512 bits: the data half's (for this direction), then the tweak half's (always
    encryption). Returns the number of rounds."""
    half = len(key) // 2
    data = round_keys(key[:half])
    if not encrypt:
        data = decryption_keys(data)
    tweak = round_keys(key[half:])
    for where, schedule in ((at, data), (at + DATA_KEY_WORDS, tweak)):
        wide = np.frombuffer(b"".join(k * 4 for k in schedule), dtype="<u8")
        state[where : where + wide.size] = wide
    return len(data) - 1


# ---- the intrinsic -----------------------------------------------------------------------
def _emit_request(context: Any, builder: Any, args: Any) -> Any:
    """LLVM IR of ``xts_request`` (see the module docstring)."""
    from llvmlite import ir

    cgutils: Any = importlib.import_module("numba.core.cgutils")  # untyped helpers
    i32, i64 = ir.IntType(32), ir.IntType(64)
    v2, v8 = ir.VectorType(i64, 2), ir.VectorType(i64, 8)

    def const(c: int) -> Any:
        return ir.Constant(i64, c)

    def splat(values: list[int]) -> Any:
        return ir.Constant(v8, values)

    def aes(name: str, x: Any, k: Any) -> Any:
        fnty = ir.FunctionType(v8, [v8, v8])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.x86.aesni.{name}.512")
        return builder.call(fn, [x, k])

    def times_alpha(v: Any, shifts: list[int]) -> Any:
        """Each 128-bit lane (two i64 words: low, high) times a^n in GF(2^128), n = the lane's
        ``shifts`` entry (0 to 7, the same for both words of a lane)."""
        up = builder.shl(v, splat(shifts))
        # the bits each word pushes out: (v >> 1) >> (63 - n), which is 0 for n = 0
        out = builder.lshr(builder.lshr(v, splat([1] * 8)), splat([63 - n for n in shifts]))
        swap = ir.Constant(ir.VectorType(i32, 8), [i ^ 1 for i in range(8)])
        other = builder.shuffle_vector(out, out, swap)  # low word: the high word's, and back
        reduced = builder.xor(  # times x^7 + x^2 + x + 1
            builder.xor(other, builder.shl(other, splat([1] * 8))),
            builder.xor(builder.shl(other, splat([2] * 8)), builder.shl(other, splat([7] * 8))),
        )
        low = ir.Constant(ir.VectorType(ir.IntType(1), 8), [1, 0] * 4)
        return builder.xor(up, builder.select(low, reduced, other))

    def cipher(xs: list[Any], keys: list[Any], mid: str, last: str) -> list[Any]:
        """AES on each register, round after round across all of them (they interleave)."""
        xs = [builder.xor(x, keys[0]) for x in xs]
        for key in keys[1:-1]:
            xs = [aes(mid, x, key) for x in xs]
        return [aes(last, x, keys[-1]) for x in xs]

    (keys_at, tweak_keys_at, rounds, first_iv, iv_step, src_at, dst_at, sectors, steps,
     decrypt) = args  # fmt: skip
    p8 = v8.as_pointer()
    keys = builder.inttoptr(keys_at, p8)
    tweak_keys = builder.inttoptr(tweak_keys_at, p8)
    src = builder.inttoptr(src_at, p8)
    dst = builder.inttoptr(dst_at, p8)
    four_tweaks = cgutils.alloca_once(builder, v8)  # T of four sectors, one per lane
    tweaks = cgutils.alloca_once(builder, v8)  # T a^0..a^3 of the current sector

    def body(nr: int, mid: str, last: str) -> None:
        def load_keys(at: Any) -> list[Any]:
            return [builder.load(builder.gep(at, [const(r)]), align=8) for r in range(nr + 1)]

        k, tk = load_keys(keys), load_keys(tweak_keys)
        quads = builder.udiv(builder.add(sectors, const(3)), const(4))
        with cgutils.for_range(builder, quads) as quad:
            first = builder.mul(quad.index, const(4))
            ivs = ir.Constant(v8, [0] * 8)
            for j in range(4):  # plain64: the sector number mod 2^64, high word 0
                number = builder.add(first_iv, builder.mul(builder.add(first, const(j)), iv_step))
                ivs = builder.insert_element(ivs, number, const(2 * j))
            builder.store(cipher([ivs], tk, "aesenc", "aesenclast")[0], four_tweaks)
            lanes = builder.bitcast(four_tweaks, v2.as_pointer())
            here = builder.sub(sectors, first)
            count = builder.select(builder.icmp_signed("<", here, const(4)), here, const(4))
            with cgutils.for_range(builder, count) as lane:
                t = builder.load(builder.gep(lanes, [lane.index]), align=8)
                wide = builder.shuffle_vector(t, t, ir.Constant(ir.VectorType(i32, 8), [0, 1] * 4))
                builder.store(times_alpha(wide, [0, 0, 1, 1, 2, 2, 3, 3]), tweaks)
                sector = builder.add(first, lane.index)
                start = builder.mul(builder.mul(sector, steps), const(4))
                with cgutils.for_range(builder, steps) as step:
                    base = builder.add(start, builder.mul(step.index, const(4)))
                    sixteen_blocks(base, k, mid, last)

    def sixteen_blocks(base: Any, k: list[Any], mid: str, last: str) -> None:
        """Blocks ``4*base`` .. ``4*base + 15``: four registers, every round interleaved."""
        tw = [builder.load(tweaks)]
        for _ in range(4):
            tw.append(times_alpha(tw[-1], [4] * 8))
        builder.store(tw.pop(), tweaks)  # the next step's
        at = [builder.add(base, const(j)) for j in range(4)]
        xs = [builder.xor(builder.load(builder.gep(src, [a]), align=1), w)
              for a, w in zip(at, tw, strict=True)]  # fmt: skip
        xs = cipher(xs, k, mid, last)
        for a, x, w in zip(at, xs, tw, strict=True):
            builder.store(builder.xor(x, w), builder.gep(dst, [a]), align=1)

    is_decrypt = builder.icmp_unsigned("!=", decrypt, const(0))
    is_long = builder.icmp_unsigned("==", rounds, const(14))
    with builder.if_else(is_decrypt) as (dec, enc):
        for branch, mid, last in ((dec, "aesdec", "aesdeclast"), (enc, "aesenc", "aesenclast")):
            with branch, builder.if_else(is_long) as (long_key, short_key):
                with long_key:
                    body(14, mid, last)
                with short_key:
                    body(10, mid, last)
    return context.get_dummy_value()


def _request_typer(
    typingctx: Any, keys: Any, tweak_keys: Any, rounds: Any, first_iv: Any, iv_step: Any,
    src: Any, dst: Any, sectors: Any, steps: Any, decrypt: Any,
) -> Any:  # fmt: skip
    """``xts_request(keys, tweak_keys, rounds, first_iv, iv_step, src, dst, sectors, steps,
    decrypt)``: addresses and IVs as uint64, counts as int64; ``steps`` = sector bytes /
    STEP_BYTES; rounds 10 or 14."""
    from numba import types

    u64, i64 = types.uint64, types.int64
    sig = types.void(u64, u64, i64, u64, u64, u64, u64, i64, i64, i64)

    def codegen(context: Any, builder: Any, signature: Any, values: Any) -> Any:
        return _emit_request(context, builder, values)

    return sig, codegen


def request_intrinsic() -> Any:
    """The numba intrinsic ``xts_request`` (imports numba: call only on the numba path)."""
    import numba.extending

    return numba.extending.intrinsic(_request_typer)
