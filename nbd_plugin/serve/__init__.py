"""Serving an unlocked image: what the nbdkit plugin and the host disk server are made of
(their modules: docs/architecture.md)."""
