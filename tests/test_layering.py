"""Import direction: server -> engine -> scheduler/memory/kernels, never back; every package
resolves inside this repo (names like `kernels` or `memory` also exist on PyPI)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "engine", "scheduler", "memory", "kernels", "clients", "loadtests")
ALLOWED = {
    "server": {"server", "engine", "scheduler", "memory", "kernels"},
    "engine": {"engine", "scheduler", "memory", "kernels"},
    "scheduler": {"scheduler", "memory"},
    "memory": {"memory"},
    "kernels": {"kernels"},
    "clients": {"clients"},
    "loadtests": {"loadtests", "clients"},
}
KERNEL_THIRD_PARTY = {"torch", "triton"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import stays inside the package
                continue
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_package_resolves_inside_repo(package):
    mod = importlib.import_module(package)
    assert Path(mod.__file__).resolve().parent == ROOT / package


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package):
    ours = set(PACKAGES)
    for path in sorted((ROOT / package).rglob("*.py")):
        used = _imports(path) & ours
        bad = used - ALLOWED[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} against the layering"


def test_memory_imports_no_third_party():
    import sys

    stdlib = set(sys.stdlib_module_names)
    for path in sorted((ROOT / "memory").rglob("*.py")):
        extra = _imports(path) - stdlib - {"memory"}
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}: memory takes ints"


def test_kernels_import_only_torch_and_triton():
    import sys

    stdlib = set(sys.stdlib_module_names)
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        extra = _imports(path) - stdlib - KERNEL_THIRD_PARTY - {"kernels"}
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"
