"""The keystore's one storage layer, for every backend (see docs/architecture.md, "Storage")."""
