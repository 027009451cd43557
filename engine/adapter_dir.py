"""`--adapter-dir DIR`: every PEFT adapter folder directly under DIR, registered at start.

S-LoRA's setting: every adapter is held in host memory (its packed blob, one copy), and pool
pages are taken only when a request first uses it (then LRU like any adapter). Each folder is
registered as a shared adapter named after the folder.

Scanning (`scan_adapter_dir`): DIR is resolved once (`realpath`); a DIR that does not exist or is
not a directory is a ValueError. Its entries are taken in sorted order (names and uids are
deterministic); hidden entries and entries that are not directories are ignored. A folder is
skipped with a WARNING naming it and the reason when its name is not a valid adapter name
(`ADAPTER_NAME_RE`, the rule the server applies too), it holds no `adapter_config.json`, it is
a symlink that leads out of DIR, or it holds a file that links out of DIR (adapter files stay
inside their root, as for `--adapter-root`).

Registering (`register_adapter_dir`): each folder is read and validated exactly like
`--adapter` (engine/adapter_loader.py); one that fails, or that could never fit the pool beside
one max-length request, is skipped with a WARNING, and start-up goes on. Per-adapter log lines
go to DEBUG; one INFO line sums up the directory.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.engine.adapters import AdapterInfo, AdapterRegistry

logger = logging.getLogger(__name__)

# The rule for every adapter name (the server's too: server/tenants.py imports it): no
# ':' (it separates "<base model>:<adapter>"), no '/', no leading '.', at most 128 characters.
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ScannedDir:
    """The outcome of `scan_adapter_dir`: candidate folders and folders refused by the scan."""

    root: str  # DIR, resolved
    found: tuple[tuple[str, str], ...]  # (adapter name, real folder path), sorted by name
    skipped: tuple[tuple[str, str], ...]  # (folder name, reason)

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.found}


@dataclass
class DirReport:
    """What `register_adapter_dir` did: the adapters registered (in sorted order) and the
    folders skipped with their reasons."""

    root: str
    registered: list[AdapterInfo] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.registered]

    def summary(self) -> str:
        """One line, e.g. "adapter dir /x: 2048 adapters registered (ranks 8-16, 5.1 GiB host),
        2 skipped (1.9 s)"."""
        n = len(self.registered)
        detail = ""
        if n:
            lo = min(i.rank for i in self.registered)
            hi = max(i.rank for i in self.registered)
            ranks = f"rank{'s' * (lo != hi)} {lo}" + (f"-{hi}" if lo != hi else "")
            detail = f" ({ranks}, {_size(sum(i.num_bytes for i in self.registered))} host)"
        return (
            f"adapter dir {self.root}: {n} adapter{'s' * (n != 1)} registered{detail}, "
            f"{len(self.skipped)} skipped ({self.seconds:.1f} s)"
        )


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _refusal(entry: os.DirEntry, root: str) -> tuple[str | None, str | None]:
    """(real path, None) for an adapter folder worth loading, (None, reason) for one to skip
    with a warning, (None, None) for an entry to ignore (not a directory)."""
    real = os.path.realpath(entry.path)
    if entry.is_symlink() and not _inside(real, root):
        return None, "it is a symlink that leads outside the adapter dir"
    if not os.path.isdir(real):
        return None, None
    if not ADAPTER_NAME_RE.match(entry.name):
        return None, f"'{entry.name}' is not a valid adapter name ({ADAPTER_NAME_RE.pattern})"
    if not os.path.isfile(os.path.join(real, "adapter_config.json")):
        return None, "no adapter_config.json in it"
    try:
        with os.scandir(real) as files:
            for f in files:
                if not _inside(os.path.realpath(f.path), root):
                    return None, f"its file {f.name!r} links outside the adapter dir"
    except OSError as e:
        return None, f"cannot list it: {e.strerror or e}"
    return real, None


def scan_adapter_dir(path: str | os.PathLike) -> ScannedDir:
    """The adapter folders directly under `path` (see the module docstring); reads no adapter
    file. ValueError if `path` does not exist or is not a directory."""
    root = os.path.realpath(path)
    if not os.path.exists(root):
        raise ValueError(f"--adapter-dir {os.fspath(path)!r} does not exist")
    if not os.path.isdir(root):
        raise ValueError(f"--adapter-dir {os.fspath(path)!r} is not a directory")
    try:
        with os.scandir(root) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise ValueError(f"--adapter-dir {os.fspath(path)!r}: {e.strerror or e}") from None
    found, skipped = [], []
    for entry in entries:
        real, reason = _refusal(entry, root)
        if real is not None:
            found.append((entry.name, real))
        elif reason is not None:
            skipped.append((entry.name, reason))
    return ScannedDir(root, tuple(found), tuple(skipped))


def register_adapter_dir(
    registry: AdapterRegistry, scanned: ScannedDir, max_pages: int
) -> DirReport:
    """Prepare and register every folder `scanned` found, in order, as a shared adapter in the
    host tier (no pool pages until first use). `max_pages` is the most pool pages an adapter may
    take (the pool less one max-length request's KV). Bad folders are skipped with a WARNING;
    one INFO line sums up. Names must not be registered yet (the caller checks clashes)."""
    t0 = time.perf_counter()
    report = DirReport(scanned.root, skipped=list(scanned.skipped))
    for folder, reason in scanned.skipped:
        _warn_skip(scanned.root, folder, reason)
    pool_pages = registry.store.pool.num_pages
    for name, path in scanned.found:
        try:
            prepared = registry.prepare(name, path)
        except Exception as e:  # noqa: BLE001 - any bad folder is skipped, start-up goes on
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            report.skipped.append((name, reason))
            _warn_skip(scanned.root, name, reason)
            continue
        if prepared.num_pages > max_pages:
            reason = (
                f"needs {prepared.num_pages} pool pages but the pool ({pool_pages} pages) has "
                f"{max_pages} beside one request of max_model_len tokens; raise --pool-bytes"
            )
            report.skipped.append((name, reason))
            _warn_skip(scanned.root, name, reason)
            continue
        report.registered.append(registry.register(prepared, quiet=True))
    report.skipped.sort()
    report.seconds = time.perf_counter() - t0
    logger.info("%s", report.summary())
    return report


def _warn_skip(root: str, folder: str, reason: str) -> None:
    logger.warning("adapter dir %s: skipped folder %r: %s", root, folder, reason)
