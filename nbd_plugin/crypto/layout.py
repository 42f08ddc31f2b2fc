"""The prepared context of a numba kernel call: one uint64 array, word by word.

``jit_cipher`` fills it once per keyed context set and direction (a request's first IV is an
argument of the kernel, not a word here: a read on the VAES kernel writes nothing, so every
reader shares one state); ``kernels`` reads it. Kept here, without numba, so both agree on one
layout. Word 9 is unused (it held the IV).
"""

OUTL = 0
"""EVP's ``int *outl`` lands here."""
UPDATE = 1
"""Address of ``EVP_CipherUpdate``."""
INIT = 2
"""Address of ``EVP_CipherInit_ex`` (the per-sector XTS kernel)."""
CTX_A = 3
"""The XTS context (per-sector kernel), the tweak key's ECB context (XTS over ECB), ESSIV's
ECB context or 0 (CBC)."""
CTX_B = 4
"""The data key's ECB context in this state's direction (XTS over ECB, CBC)."""
WORDS = 5
"""uint64 words per sector."""
STEP = 6
"""IV step per sector."""
MASK = 7
"""IV mask: 2^64-1, or 2^32-1 for CBC's "plain"."""
ENCRYPT = 8
"""1 to encrypt, 0 to decrypt."""
ROUNDS = 10
"""AES rounds of the VAES kernel's key (10 or 14)."""
PREAD = 11
"""Address of libc's ``pread`` (the fused read kernels)."""
PWRITE = 12
"""Address of libc's ``pwrite`` (the fused write kernels)."""
ERRNO = 13
"""Address of libc's ``__errno_location`` (a failed pread/pwrite reports its errno)."""
HEAD = 16
"""Scratch from here: 2 words of IV per sector of a chunk, then the chunk's tweaks (XTS) or
cipher output (CBC), ``words`` per sector. The per-sector kernel uses 2 words (one IV); the
VAES kernel holds its round keys here (``vaes.fill_state``)."""

# What a kernel returns besides 0 (done).
FAILED = -1
"""libcrypto reported a failure."""
SHORT = -2
"""The fused kernel's pread met the end of the file, or its pwrite wrote nothing: the caller
does that I/O again in Python, which says where the image ended or raises."""
OS_ERROR = -1000
"""The fused kernel's pread or pwrite failed: it returns ``OS_ERROR - errno`` (the caller
raises OSError(errno) at once: redoing the I/O could consume a one-time EIO, and the disk
must see that EIO to refuse later writes and flushes)."""
ZERO_HEAD = 1
"""The fused read found a zero word where it checks for holes: the data is read but not
decrypted (the caller decrypts it and looks for holes)."""
FAULTED = -3
"""The mapped read (``mapped``) met a page that faulted (truncated, or an I/O error): what it
wrote is not to be used; the caller reads through pread, which reports the cause."""
