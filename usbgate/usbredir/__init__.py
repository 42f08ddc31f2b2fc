"""The usbredir 0.7 protocol, sans-IO: one frozen dataclass per packet and the ``Connection``
codec (its modules: docs/architecture.md)."""
