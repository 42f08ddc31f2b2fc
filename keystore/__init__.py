"""The vmshield keystore: VMs, disks, users, permissions, USB rules and an audit chain, and the
`vmshield` CLI over its workflows. Nothing stored here decrypts a disk: only a LUKS keyslot does.

Its packages, modules and layers: docs/architecture.md ("Package map", "The dependency rule").
"""
