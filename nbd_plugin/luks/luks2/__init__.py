"""LUKS2: the binary and JSON headers, keyslots, tokens and the Format module on a descriptor
(its modules: docs/architecture.md)."""
