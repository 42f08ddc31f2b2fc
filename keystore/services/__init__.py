"""The keystore's workflows, callable without click (each module: docs/architecture.md)."""
