"""The lab: everything that builds, runs and measures vmshield without being vmshield; not
installed and never imported by the product. Its modules: docs/architecture.md ("scripts/").
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository checkout the lab runs from."""
