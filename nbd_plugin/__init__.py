"""The disk side of vmshield: LUKS images served as plaintext over NBD by nbdkit, and deep erase.

Its packages, modules and layers: docs/architecture.md ("Package map", "The dependency rule").
"""
