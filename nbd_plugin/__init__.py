"""The disk side of vmshield: LUKS containers served as plaintext over NBD.

- plugin.py: the thin file nbdkit loads; errors: the product's one error hierarchy;
- luks/: the LUKS1/LUKS2 format library (no nbdkit, no click): volume (probe, open, create,
  keyslots), luks1/ and luks2/ (on-disk formats and their fd I/O), af, fields, regions;
- crypto/: the cipher registry, XTS (batched, with a native libcrypto path), CBC, PBKDF2, argon2;
- serve/: nbdkit configuration, the plaintext disk view, passphrase sources;
- osutil/: every syscall helper once (exact I/O, holes and extents, block devices, locking);
- erase/: deep erase (the benchmarks are the lab's: scripts/lab/bench/).
"""
