"""What is SQLite's alone under the one storage layer (its modules: docs/architecture.md)."""
