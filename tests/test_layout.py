"""The package layout: what the import contracts rely on, and what the wheel holds.

import-linter cannot say "all of usbgate but the rule model", so two contracts
(pyproject.toml, [tool.importlinter]) list usbgate's other modules (and the leaf's one lists the
disk side's): these tests fail when a new module is missing from a list, so the lists cannot
rot into letting an import through. The lab (scripts/lab: rigs, demo, benchmarks) is no part
of the product: the wheel built from the checkout holds none of it.
"""

from __future__ import annotations

import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
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


#: members of the wheel that are rigs or benchmarks, wherever they would sit
LAB_MARKERS = ("scripts/", "lab/", "bench", "qmp", "tempcluster")


def test_the_wheel_holds_the_product_and_nothing_of_the_lab(tmp_path: Path) -> None:
    """pip wheel of a copy of the checkout (scripts/ included), with the venv's setuptools."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("nbd_plugin", "keystore", "usbgate", "scripts"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "wheel"), str(src)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("vmshield-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    product = [n for n in names if ".dist-info/" not in n]
    assert {n.split("/")[0] for n in product} == {"nbd_plugin", "keystore", "usbgate"}
    lab = [n for n in product if any(marker in n for marker in LAB_MARKERS)]
    assert not lab, f"the wheel holds lab code: {lab}"
    for member in ("nbd_plugin/plugin.py", "keystore/cli/__init__.py", "usbgate/cli.py",
                   "usbgate/rules/policy.py", "usbgate/sources/keystore.py"):  # fmt: skip
        assert member in names, member


def test_the_keystore_and_usbgate_agree_where_the_usbgate_host_listens() -> None:
    # the keystore may not import usbgate.host (the contracts above), so it names the default
    # control socket itself: the two must not drift apart
    from keystore.services import usbhost
    from usbgate import host

    assert str(usbhost.DEFAULT_CONTROL) == str(host.DEFAULT_CONTROL)


def _package_map() -> str:
    """The code block under "## Package map" in docs/architecture.md."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc.split("## Package map", 1)[1]
    return section.split("```", 2)[1]


def test_the_package_map_names_every_module_and_no_module_that_is_gone() -> None:
    """docs/architecture.md is the one map: a new module must be written into it, and a
    module it names must exist (the package docstrings point there instead of listing)."""
    text = _package_map()
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
    modules = [
        path
        for top in ("nbd_plugin", "keystore", "usbgate", "scripts/lab")
        for path in sorted((ROOT / top).rglob("*.py"))
        if path.stem not in ("__init__", "__main__")
    ]
    assert modules
    unnamed = [str(p.relative_to(ROOT)) for p in modules if p.stem not in words]
    assert unnamed == [], f"modules docs/architecture.md does not name: {unnamed}"
    stems = {p.stem for p in modules} | {"__init__", "guest-init"}
    named = set(re.findall(r"([A-Za-z_][A-Za-z0-9_-]*)\.(?:py|sh)\b", text))
    assert named - stems == set(), f"modules the map names that do not exist: {named - stems}"
