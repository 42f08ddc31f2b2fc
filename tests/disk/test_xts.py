"""The XTS ciphers against IEEE Std 1619-2007 Annex B and a per-sector reference, every path.

Paths: the numba kernel (``JitXts``: one native call per request, in chunks of
``jit_cipher.CHUNK_BYTES``), and the numpy fallback (``XtsCipher``): libcrypto one sector at a
time (requests of <= 32 sectors, and 4096-byte sectors), numpy's vectorised tweaks (larger
requests, or ``native=False``), numpy's chunked planes (more than xts.CHUNK sectors, padded),
and the alpha^32 chain of 4096-byte sectors.
"""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbd_plugin.crypto import jit_cipher, vaes, xts
from nbd_plugin.crypto.xts import XtsCipher
from nbd_plugin.crypto.xts_native import JitXts

NO_VAES = pytest.mark.skipif(
    vaes.unavailable() is not None, reason=f"the VAES kernel cannot run here: {vaes.unavailable()}"
)
PATHS = [
    "numba",
    pytest.param("numba-vaes", marks=NO_VAES),
    "numba-xts",
    "numba-ecb",
    "libcrypto",
    "numpy",
]
"""numba: the kernel chosen for the sector size (the VAES kernel on a CPU that has it, else
OpenSSL's XTS per sector for LUKS's sizes); numba-vaes, numba-xts (OpenSSL's XTS per sector),
numba-ecb (tweaks and AES-ECB): that kernel, forced."""
FORCED = {"ecb": "aes-ecb", "xts": "openssl-xts", "vaes": "vaes-xts"}
Sector = XtsCipher | JitXts


def make(key: bytes, path: str, sector_size: int = 512, step: int = 1) -> Sector:
    if path == "numba":
        return JitXts(key, sector_size, step)
    if path.startswith("numba-"):
        return JitXts(key, sector_size, step, kernel=FORCED[path[6:]])
    return XtsCipher(key, sector_size, step, native=path == "libcrypto")


COUNTING = bytes(i % 256 for i in range(512))
KEY_128 = "27182818284590452353602874713526" + "31415926535897932384626433832795"
KEY_256 = (
    "2718281828459045235360287471352662497757247093699959574966967627"
    "3141592653589793238462643383279502884197169399375105820974944592"
)

# IEEE Std 1619-2007 Annex B. Vectors 1-3: 32-byte data units, whole ciphertext given.
SHORT_VECTORS = [
    (
        1,
        "00" * 32,
        0,
        "00" * 32,
        "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e",
    ),
    (
        2,
        "11" * 16 + "22" * 16,
        0x3333333333,
        "44" * 32,
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
    ),
    (
        3,
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0" + "22" * 16,
        0x3333333333,
        "44" * 32,
        "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
    ),
]

# Vectors 4-6 (XTS-AES-128, each encrypting the one before) and 10-14 (XTS-AES-256, the
# counting plaintext): 512-byte units. The first 32 and last 16 ciphertext bytes as printed
# in the standard, and the SHA-256 of the whole 512 bytes.
LONG_VECTORS = [
    (
        4,
        KEY_128,
        0,
        "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c",
        "0a282df920147beabe421ee5319d0568",
        "ebee4d64dd2395bb2d6a2d37a0a48ecb2bf4913cfc99d27c2214f2f4144715ea",
    ),
    (
        5,
        KEY_128,
        1,
        "264d3ca8512194fec312c8c9891f279fefdd608d0c027b60483a3fa811d65ee5",
        "fd2a89ccb45e001a03a867b187f225dd",
        "bed1b9d9bf8ce83a2ae1981fbd5f2b0c40e21bba5d57df2ea16ecd0975f25215",
    ),
    (
        6,
        KEY_128,
        2,
        "fa762a3680b76007928ed4a4f49a9456031b704782e65e16cecb54ed7d017b5e",
        "4bcf518138dc3a25c5e236171a2d01d6",
        "68f1e84faa401c9914a7fd6fc565eaa7b531cedbc22bd28269aa58b15ceec03f",
    ),
    (
        10,
        KEY_256,
        0xFF,
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
        "c4f36ffda9fcea70b9c6e693e148c151",
        "e97e974fa393af794f7a4684395814cf820de60a01eaec677d87b452e316b364",
    ),
    (
        11,
        KEY_256,
        0xFFFF,
        "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11",
        "a4f9e27b42af8100cb9d59cef9645803",
        "def4fad29e95dfe1a24b1ad4620f86d7be094cced5b19e0b121aa82d9e6baf98",
    ),
    (
        12,
        KEY_256,
        0xFFFFFF,
        "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200",
        "2263a1eef52dd6888c309f5a7d712826",
        "8bf44861a081dd660d91ce615b5cdfb4d5df9d72c3025c12e67cc0ae097fa5d5",
    ),
    (
        13,
        KEY_256,
        0xFFFFFFFF,
        "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5",
        "4c82f335abb152c4a93411373aaa8220",
        "c706140a11affda7402234f5e6331eacbfeb687d8e80d83962691823bb3636f0",
    ),
    (
        14,
        KEY_256,
        0xFFFFFFFFFF,
        "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed23",
        "d609d273ad5b0d59631c531f6a0a57b9",
        "afba71abc4e95b186d89a63a5437c1bafcfd1a18ca273970c534aba4f8d05282",
    ),
]


def openssl_xts(key: bytes, unit: int, data: bytes, *, encrypt: bool = True) -> bytes:
    """One data unit through cryptography's own XTS mode."""
    cipher = Cipher(algorithms.AES(key), modes.XTS((unit % (1 << 64)).to_bytes(16, "little")))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(data) + ctx.finalize()


def reference(key: bytes, data: bytes, first: int, size: int = 512, step: int = 1) -> bytes:
    """The straightforward per-sector implementation: one cryptography XTS call per sector."""
    return b"".join(
        openssl_xts(key, first + j * step, data[j * size : (j + 1) * size])
        for j in range(len(data) // size)
    )


def both_ways(cipher: Sector, plain: bytes, first: int, expected: bytes) -> None:
    """Out of place and in place, encrypt and decrypt, must all agree with ``expected``."""
    out = bytearray(len(plain))
    cipher.encrypt(plain, out, first)
    assert bytes(out) == expected
    back = bytearray(len(plain))
    cipher.decrypt(bytes(out), back, first)
    assert bytes(back) == plain
    buf = bytearray(plain)
    cipher.encrypt(buf, buf, first)
    assert bytes(buf) == expected
    cipher.decrypt(memoryview(buf), memoryview(buf), first)
    assert bytes(buf) == plain


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("number", "key", "unit", "plain", "cipher"), SHORT_VECTORS)
def test_ieee1619_short_vectors(
    path: str, number: int, key: str, unit: int, plain: str, cipher: str
) -> None:
    k, p, c = bytes.fromhex(key), bytes.fromhex(plain), bytes.fromhex(cipher)
    if path == "numba-vaes":  # its step is 256 bytes: these 32-byte units go to aes-ecb
        with pytest.raises(ValueError, match="multiple of 256"):
            make(k, path, sector_size=32)
        assert JitXts(k, 32, 1).kernel_name == "aes-ecb"
        return
    if path == "numba-xts" and k[:16] == k[16:]:  # OpenSSL's XTS refuses equal halves
        with pytest.raises(ValueError, match="refused"):
            make(k, path, sector_size=32)
        return
    both_ways(make(k, path, sector_size=32), p, unit, c)
    if k[:16] == k[16:]:  # vector 1: equal halves, which cryptography (and OpenSSL) refuse
        with pytest.raises(ValueError):
            openssl_xts(k, unit, p)
        assert not XtsCipher(k, sector_size=32).uses_libcrypto
    else:
        assert openssl_xts(k, unit, p) == c


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("number", "key", "unit", "head", "tail", "digest"), LONG_VECTORS)
def test_ieee1619_512_byte_vectors(
    path: str, number: int, key: str, unit: int, head: str, tail: str, digest: str
) -> None:
    k = bytes.fromhex(key)
    plain = COUNTING
    if number in (5, 6):  # vector 5 encrypts vector 4's ciphertext, 6 encrypts 5's
        plain = openssl_xts(k, 0, plain)
    if number == 6:
        plain = openssl_xts(k, 1, plain)
    expected = openssl_xts(k, unit, plain)
    assert expected[:32].hex() == head
    assert expected[-16:].hex() == tail
    assert hashlib.sha256(expected).hexdigest() == digest
    cipher = make(k, path)
    if isinstance(cipher, XtsCipher):
        assert cipher.uses_libcrypto == (path == "libcrypto")
    else:
        chosen = jit_cipher.xts_kernel_for(512)
        assert cipher.kernel_name == {"numba": chosen, **FORCED}.get(path[6:], chosen)
    both_ways(cipher, plain, unit, expected)
    # The same unit inside a 41-sector request (numpy's planes, or the kernel's chunk loop).
    at = min(unit, 3)
    rest = os.urandom(512 * 40)
    data = rest[: 512 * at] + plain + rest[512 * at :]
    out = bytearray(len(data))
    make(k, "numpy" if path == "libcrypto" else path).encrypt(data, out, unit - at)
    assert bytes(out[512 * at : 512 * (at + 1)]) == expected


CHUNK = jit_cipher.CHUNK_BYTES // 512  # sectors per kernel chunk
SIZES_512 = sorted({1, 3, 7, 8, 31, 32, 33, 127, 128, 129, 257, 2048, CHUNK - 1, CHUNK, CHUNK + 1})


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("key_bytes", [32, 64])
@pytest.mark.parametrize("sectors", SIZES_512)
def test_matches_per_sector_reference(path: str, key_bytes: int, sectors: int) -> None:
    key = os.urandom(key_bytes)
    data = os.urandom(512 * sectors)
    first = int.from_bytes(os.urandom(5), "little")
    both_ways(make(key, path), data, first, reference(key, data, first))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("sectors", "step"), [(1, 8), (3, 8), (16, 8), (256, 8), (5, 1)])
def test_4096_byte_sectors(path: str, sectors: int, step: int) -> None:
    key = os.urandom(64)
    data = os.urandom(4096 * sectors)
    first = 8 * 12345
    cipher = make(key, path, 4096, step)
    both_ways(cipher, data, first, reference(key, data, first, 4096, step))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("size", "step"), [(512, 1), (4096, 8), (4096, 1)])
def test_plain64_wraps_at_2_64(path: str, size: int, step: int) -> None:
    key = os.urandom(64)
    for sectors in (7, 300):
        data = os.urandom(size * sectors)
        first = (1 << 64) - 3 * step
        out = bytearray(len(data))
        make(key, path, size, step).encrypt(data, out, first)
        assert bytes(out) == reference(key, data, first, size, step)


@pytest.mark.parametrize("path", PATHS)
def test_sizes_after_each_other_reuse_scratch_correctly(path: str) -> None:
    """Pooled scratch of a large request must not leak into a smaller one, nor back."""
    key = os.urandom(64)
    cipher = make(key, path)
    for sectors in (2048, 8, 129, 1, 2048, 64):
        data = os.urandom(512 * sectors)
        out = bytearray(len(data))
        cipher.encrypt(data, out, sectors)
        assert bytes(out) == reference(key, data, sectors)


@pytest.mark.parametrize("path", PATHS)
def test_threads_share_one_cipher(path: str) -> None:
    key = os.urandom(64)
    cipher = make(key, path)
    cases = [(os.urandom(512 * n), n * 7) for n in (8, 128, 129, 8, 64, 2048)]
    expected = [reference(key, d, f) for d, f in cases]
    errors: list[str] = []

    def work() -> None:
        for _ in range(5):
            for (data, first), want in zip(cases, expected, strict=True):
                out = bytearray(len(data))
                cipher.encrypt(data, out, first)
                if bytes(out) != want:
                    errors.append(f"{len(data)} bytes at {first}")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("path", PATHS)
def test_refuses_bad_arguments(path: str) -> None:
    with pytest.raises(ValueError, match="256- or 512-bit"):
        make(os.urandom(48), path)
    with pytest.raises(ValueError, match="sector size"):
        make(os.urandom(64), path, sector_size=520)
    cipher = make(os.urandom(64), path)
    with pytest.raises(ValueError, match="multiple of 512"):
        cipher.encrypt(bytes(700), bytearray(700), 0)
    cipher.encrypt(b"", bytearray(), 0)  # nothing to do, no error


@pytest.mark.parametrize("path", ["numba", "numba-ecb", "numpy"])
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_requests_larger_than_one_piece(path: str, sector_size: int) -> None:
    key = os.urandom(64)
    sectors = xts.MAX_BYTES // sector_size + 3
    data = os.urandom(sector_size * sectors)
    step = sector_size // 512
    expected = reference(key, data, 40, sector_size, step)
    both_ways(make(key, path, sector_size, step), data, 40, expected)


@pytest.mark.parametrize("path", ["numba", "numba-ecb", "numpy"])
def test_chunk_padding_is_not_written(path: str) -> None:
    """A request padded up to whole chunks writes only its own bytes."""
    key = os.urandom(64)
    sectors = xts.CHUNK + 5
    data = os.urandom(512 * sectors)
    out = bytearray(os.urandom(512 * (sectors + 4)))
    guard = bytes(out[512 * sectors :])
    make(key, path).encrypt(data, memoryview(out)[: len(data)], 0)
    assert bytes(out[: len(data)]) == reference(key, data, 0)
    assert bytes(out[len(data) :]) == guard


@pytest.mark.parametrize(("sector_size", "step"), [(512, 1), (1024, 2), (4096, 8), (8192, 16)])
@pytest.mark.parametrize("key_bytes", [32, 64])
def test_luks_sector_sizes_run_on_the_fastest_kernel(
    sector_size: int, step: int, key_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = os.urandom(key_bytes)
    data = os.urandom(sector_size * 9)
    want = reference(key, data, 77 * step, sector_size, step)
    cipher = JitXts(key, sector_size, step)
    assert cipher.kernel_name == ("vaes-xts" if vaes.unavailable() is None else "openssl-xts")
    both_ways(cipher, data, 77 * step, want)
    monkeypatch.setattr(vaes, "_refused", "refused for this test")  # as after a failed check
    cipher = JitXts(key, sector_size, step)
    assert cipher.kernel_name == "openssl-xts"
    both_ways(cipher, data, 77 * step, want)


def test_keys_openssl_refuses_and_small_units_run_on_the_ecb_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    equal = bytes(range(32)) * 2  # halves equal: OpenSSL's XTS will not encrypt with it
    data = os.urandom(4096 * 3)
    back = bytearray(len(data))
    for refused in (None, "refused for this test"):
        monkeypatch.setattr(vaes, "_refused", refused)
        cipher = JitXts(equal, 4096, 8)
        assert cipher.kernel_name == ("vaes-xts" if vaes.unavailable() is None else "aes-ecb")
        out = bytearray(len(data))
        cipher.encrypt(data, out, 8)
        XtsCipher(equal, 4096, 8, native=False).decrypt(bytes(out), back, 8)
        assert bytes(back) == data
    assert JitXts(os.urandom(64), 256, 1).kernel_name == (
        "vaes-xts" if vaes.unavailable() is None else "aes-ecb"
    )
    assert JitXts(os.urandom(64), 128, 1).kernel_name == "aes-ecb"
    with pytest.raises(ValueError, match="kernel must be one of"):
        JitXts(os.urandom(64), 512, 1, kernel="fast")


def test_nbdkit_buffers_as_they_come() -> None:
    """nbdkit hands the plugin 1-D byte memoryviews (read-only for writes); a numpy array's
    memoryview of another format works too, a read-only destination does not."""
    key = os.urandom(64)
    cipher = JitXts(key, 4096, 8)
    data = os.urandom(4096 * 2)
    want = reference(key, data, 16, 4096, 8)
    out = bytearray(len(data))
    cipher.encrypt(memoryview(data), memoryview(out), 16)
    assert bytes(out) == want
    words = bytearray(data)
    cipher.encrypt(memoryview(words).cast("Q"), memoryview(words).cast("Q"), 16)
    assert bytes(words) == want
    with pytest.raises(TypeError):
        cipher.encrypt(data, memoryview(want), 16)
    with pytest.raises(ValueError, match="dst holds"):
        cipher.encrypt(data, bytearray(4096), 16)
