"""The package layout the import contracts rely on (pyproject.toml, [tool.importlinter]).

import-linter cannot say "all of usbgate but the rule model", so two contracts list usbgate's
other modules (and the leaf's one lists the disk side's): these tests fail when a new module
is missing from a list, so the lists cannot rot into letting an import through.
"""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path
from typing import Any

import nbd_plugin
import usbgate

ROOT = Path(__file__).resolve().parent.parent


def _contract(contract_id: str) -> dict[str, Any]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c.get("id") == contract_id]
    return contract


def _children(package: Any, *allowed: str) -> set[str]:
    """The package's direct submodules and subpackages, but the ones named in `allowed`."""
    prefix = package.__name__ + "."
    return {
        prefix + m.name for m in pkgutil.iter_modules(package.__path__) if m.name not in allowed
    }


def test_the_keystore_contract_forbids_every_usbgate_module_but_the_rules() -> None:
    contract = _contract("keystore-usbgate")
    assert contract["source_modules"] == ["keystore"]
    missing = _children(usbgate, "rules") - set(contract["forbidden_modules"])
    assert not missing, f"add {sorted(missing)} to the keystore-usbgate contract"
    assert "usbgate.rules" not in contract["forbidden_modules"]


def test_the_rules_leaf_contract_forbids_all_of_vmshield_but_the_error_hierarchy() -> None:
    contract = _contract("rules-leaf")
    assert contract["source_modules"] == ["usbgate.rules"]
    forbidden = set(contract["forbidden_modules"])
    wanted = _children(usbgate, "rules") | _children(nbd_plugin, "errors") | {"keystore"}
    missing = wanted - forbidden
    assert not missing, f"add {sorted(missing)} to the rules-leaf contract"
