"""Shared fixtures' helpers and real-tool wrappers for the tests (never imported by the product)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository's top directory."""
