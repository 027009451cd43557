"""One installed name, `loraplex`: the wheel holds `loraplex/...` and its metadata only, and
from the repo root the bare names of our folders find other projects' packages first
(transformers imports Hugging Face's `kernels`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from loraplex.kernels import cpu_build

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("engine", "scheduler", "memory", "kernels", "server", "clients", "loadtests")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """`pip wheel --no-deps` of a copy of the sources (the build writes into its tree)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for part in PARTS:
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
           "-w", str(out), str(src)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("loraplex-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_wheel_holds_only_loraplex(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    (dist_info,) = [t for t in tops if t.endswith(".dist-info")]
    assert tops == {"loraplex", dist_info}, sorted(tops)
    assert dist_info.startswith("loraplex-")


def test_wheel_holds_every_source_file(wheel):
    names = set(wheel.namelist())
    for part in PARTS:
        for path in (ROOT / part).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            assert f"loraplex/{rel}" in names, f"{rel} missing from the wheel"
    # the CPU kernels are compiled from these on first use
    for path in (*cpu_build.SOURCES, *cpu_build.HEADERS, cpu_build.CALL_SOURCE):
        assert f"loraplex/kernels/{path.name}" in names, f"{path.name} missing from the wheel"
    assert not [n for n in names if n.endswith("__init__.py")]


def test_wheel_console_script(wheel):
    (ep,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(ep).decode()
    assert "loraplex = loraplex.server.cli:main" in text


def test_wheel_imports_as_loraplex(wheel, tmp_path):
    """The unpacked wheel alone (no site-packages, no editable hook) imports by its new names."""
    wheel.extractall(tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "import loraplex.memory.integrity as m; print(m.__file__)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / "loraplex" / "memory" / "integrity.py"


def test_repo_root_does_not_shadow_installed_packages():
    """`python -c` from the root puts the root first on sys.path, as pytest and `python -m` do."""
    code = (
        "import transformers.modeling_utils, peft, kernels, sys; "
        "print(kernels.__file__); print(getattr(kernels, 'get_kernel', None) is not None)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, is_hf = proc.stdout.split()
    assert not Path(where).resolve().is_relative_to(ROOT / "kernels"), where
    assert is_hf == "True"


def test_python_dash_m_entry_points():
    for module in ("loraplex.server", "loraplex.loadtests.locust_run"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, f"{module}: {proc.stderr[-2000:]}"
        assert "usage:" in proc.stdout
