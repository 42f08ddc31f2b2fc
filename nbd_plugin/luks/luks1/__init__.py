"""LUKS1: the on-disk format and the Format module on a descriptor (docs/architecture.md)."""
