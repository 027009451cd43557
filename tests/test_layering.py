"""Import direction: server -> engine -> scheduler/memory/kernels, never back. Every part is
`loraplex.<part>` and resolves to its folder in this repo; no bare name of ours is imported."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("server", "engine", "scheduler", "memory", "kernels", "clients", "loadtests")
ALLOWED = {
    "server": {"server", "engine", "scheduler", "memory", "kernels"},
    "engine": {"engine", "scheduler", "memory", "kernels"},
    "scheduler": {"scheduler", "memory"},
    "memory": {"memory"},
    "kernels": {"kernels"},
    "clients": {"clients"},
    "loadtests": {"loadtests", "clients"},
}
# The `loraplex` command is composed in server/cli.py: it adds the load-test suite's
# `bench serve` and hands it the engine pieces it needs (loadtests imports no engine code).
FILE_EXCEPTIONS = {"server/cli.py": {"loadtests"}}
KERNEL_THIRD_PARTY = {"torch", "triton"}


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports (`from a.b import c` gives `a.b`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.relative_to(ROOT)}: relative import (use loraplex.*)"
            names.add(node.module)
    return names


def _parts_used(path: Path) -> set[str]:
    """The loraplex parts a file imports."""
    used = set()
    for name in _imported_modules(path):
        top, _, rest = name.partition(".")
        if top == "loraplex":
            used.add(rest.split(".")[0])
    return used


def _sources(part: str) -> list[Path]:
    return sorted((ROOT / part).rglob("*.py"))


@pytest.mark.parametrize("part", PARTS)
def test_part_resolves_to_its_folder(part):
    mod = importlib.import_module(f"loraplex.{part}")
    # an editable install adds a path-hook entry that is no folder; the folders are ours alone
    folders = [Path(p).resolve() for p in mod.__path__ if Path(p).is_dir()]
    assert folders == [ROOT / part]


@pytest.mark.parametrize("part", PARTS)
def test_part_has_no_init_file(part):
    """An __init__.py would make `import kernels` from the repo root find our folder."""
    assert not (ROOT / part / "__init__.py").exists()


@pytest.mark.parametrize("part", PARTS)
def test_import_direction(part):
    for path in _sources(part):
        allowed = ALLOWED[part] | FILE_EXCEPTIONS.get(path.relative_to(ROOT).as_posix(), set())
        bad = _parts_used(path) - allowed
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} against the layering"


@pytest.mark.parametrize("part", PARTS)
def test_no_bare_part_names(part):
    """`import engine` or `from kernels.x import` would pick up someone else's package."""
    for path in [*_sources(part), *sorted((ROOT / "tests").glob("*.py"))]:
        bare = {n for n in _imported_modules(path) if n.split(".")[0] in PARTS}
        assert not bare, f"{path.relative_to(ROOT)} imports {sorted(bare)} without `loraplex.`"


def test_layering_check_catches_a_backward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from loraplex.server.app import create_app\nimport loraplex.engine.llm\n")
    assert _parts_used(bad) == {"server", "engine"}


def test_memory_imports_no_third_party():
    stdlib = set(sys.stdlib_module_names)
    for path in _sources("memory"):
        tops = {n.split(".")[0] for n in _imported_modules(path)}
        extra = tops - stdlib - {"loraplex"}
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}: memory takes ints"


def test_kernels_import_only_torch_and_triton():
    stdlib = set(sys.stdlib_module_names)
    for path in _sources("kernels"):
        tops = {n.split(".")[0] for n in _imported_modules(path)}
        extra = tops - stdlib - KERNEL_THIRD_PARTY - {"loraplex"}
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"
