"""Shared check for the Triton test files: AOT-compile a kernels module for sm_90 with Triton's
bundled ptxas (no GPU needed). It catches what the interpreter does not: non-constexpr
globals, layouts, register spills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAS_PTXAS = (Path(__import__("triton").__file__).parent / "backends/nvidia/bin/ptxas").exists()
needs_ptxas = pytest.mark.skipif(not HAS_PTXAS, reason="Triton without its bundled ptxas")


def assert_compiles_for_hopper(module: str, dtypes: tuple[str, ...], cache_dir: Path) -> None:
    """Run `module.compile_all(dtypes=...)` in a fresh interpreter (TRITON_INTERPRET off) and
    check every kernel compiled and reported its register use."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    code = (
        f"import json; from {module} import compile_all; "
        f"print(json.dumps(compile_all(dtypes={dtypes!r})))"
    )
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-4000:]
    usage = json.loads(res.stdout.strip().splitlines()[-1])
    assert usage and all("REG:" in u or u == "" for u in usage.values()), usage
