"""`scripts/bench`: the disk data path against its peers, over NBD, in one run (its modules:
docs/architecture.md)."""
