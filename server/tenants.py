"""Tenants, API keys and who sees which adapter.

`--tenants FILE.toml` holds `[[tenants]]` tables: `name`, `api_keys` (list), optional
`admin = true`, optional `adapters = { NAME = "path under --adapter-root" }` (loaded at start,
owned by that tenant), optional `requests_per_minute` and `tokens_per_minute` (positive ints;
server/rate_limits.py). `--api-key KEY` adds one admin tenant named "admin"; with neither option
the server is open and every request acts as the admin tenant "default".

Adapter names: adapters given with `--adapter` (and the demo's) are *shared*: every tenant sees
and uses them. Every other adapter is *owned* by one tenant and visible to it only; to anyone
else it does not exist (404, exactly like a missing name). The engine's adapter names are
global, so an owned adapter is registered in the engine as "<tenant>/<name>@<load number>":
two tenants may both have a "support" adapter, and a reload under the same name is a different
engine adapter even while the old one drains.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from loraplex.engine.adapter_dir import ADAPTER_NAME_RE

NAME_RE = ADAPTER_NAME_RE  # one rule for every adapter name (engine/adapter_dir.py)
TENANT_KEYS = {"name", "api_keys", "admin", "adapters", "requests_per_minute", "tokens_per_minute"}


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Tenant:
    name: str
    admin: bool = False
    adapters: dict[str, str] = field(default_factory=dict)  # public name -> path (from TOML)
    usage: Usage = field(default_factory=Usage)
    requests_per_minute: int | None = None  # server/rate_limits.py; None: not limited
    tokens_per_minute: int | None = None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Tenants:
    """API key -> tenant. `open` (no keys configured): every request is the admin "default"."""

    def __init__(self, tenants: list[Tenant], keys: dict[str, str]) -> None:
        self.by_name = {t.name: t for t in tenants}
        self._by_key = {_digest(k): name for k, name in keys.items()}
        self.open = not keys
        if self.open:
            self.by_name = {"default": Tenant("default", admin=True)}

    @classmethod
    def from_options(cls, path: str | None = None, api_key: str | None = None) -> Tenants:
        """Build from `--tenants FILE` and/or `--api-key`. ValueError with the reason."""
        tenants: list[Tenant] = []
        keys: dict[str, str] = {}
        if path is not None:
            tenants, keys = _read_toml(path)
        if api_key is not None:
            if not api_key:
                raise ValueError("--api-key must not be empty")
            if "admin" in {t.name for t in tenants}:
                raise ValueError("--api-key adds a tenant named 'admin', which the file has")
            if api_key in keys:
                raise ValueError("--api-key is also a key of a tenant in the file")
            tenants.append(Tenant("admin", admin=True))
            keys[api_key] = "admin"
        return cls(tenants, keys)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant for an `Authorization: Bearer KEY` header, None if invalid or missing."""
        if self.open:
            return self.by_name["default"]
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        name = self._by_key.get(_digest(key.strip()))
        return self.by_name.get(name) if name else None


def _read_toml(path: str) -> tuple[list[Tenant], dict[str, str]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"--tenants {path}: {e}") from None
    unknown = set(data) - {"tenants"}
    if unknown:
        raise ValueError(f"--tenants {path}: unknown top-level keys {sorted(unknown)}")
    rows = data.get("tenants", [])
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"--tenants {path}: expected one or more [[tenants]] tables")
    tenants, keys = [], {}
    for i, row in enumerate(rows):
        where = f"--tenants {path}: tenants[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a table")
        if set(row) - TENANT_KEYS:
            raise ValueError(f"{where}: unknown keys {sorted(set(row) - TENANT_KEYS)}")
        name = row.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"{where}: 'name' must match {NAME_RE.pattern}, got {name!r}")
        if name in {t.name for t in tenants}:
            raise ValueError(f"{where}: tenant name {name!r} is used twice")
        api_keys = row.get("api_keys")
        if not isinstance(api_keys, list) or not api_keys:
            raise ValueError(f"{where}: 'api_keys' must be a non-empty list of strings")
        for key in api_keys:
            if not isinstance(key, str) or not key:
                raise ValueError(f"{where}: every api key must be a non-empty string")
            if key in keys:
                raise ValueError(f"{where}: an api key is used twice")
            keys[key] = name
        admin = row.get("admin", False)
        if not isinstance(admin, bool):
            raise ValueError(f"{where}: 'admin' must be true or false")
        adapters = row.get("adapters", {})
        if not isinstance(adapters, dict) or not all(
            isinstance(k, str) and NAME_RE.match(k) and isinstance(v, str)
            for k, v in adapters.items()
        ):
            raise ValueError(f"{where}: 'adapters' must map adapter names to path strings")
        limits = {}
        for limit in ("requests_per_minute", "tokens_per_minute"):
            value = row.get(limit)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):  # fmt: skip
                raise ValueError(f"{where}: {limit!r} must be a positive integer, got {value!r}")
            limits[limit] = value
        tenants.append(Tenant(name, admin=admin, adapters=dict(adapters), **limits))
    return tenants, keys


@dataclass
class AdapterEntry:
    """One loaded adapter as the server knows it. `owner` None = shared."""

    name: str  # public name
    engine_name: str
    owner: str | None
    info: object = None  # engine.adapters.AdapterInfo, None while loading
    created: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict:
        info = self.info
        return {
            "id": self.name,
            "object": "adapter",
            "owner": self.owner,
            "shared": self.owner is None,
            "created": self.created,
            "load_id": info.uid,
            "rank": info.rank,
            "alpha": info.alpha,
            "target_modules": list(info.target_modules),
            "size_bytes": info.num_bytes,
            "pool_pages": info.num_pages,
        }


class AdapterNamespace:
    """Public adapter names per tenant. Event-loop only (no locking)."""

    def __init__(self) -> None:
        self.shared: dict[str, AdapterEntry] = {}
        self.owned: dict[str, dict[str, AdapterEntry]] = {}
        self._loads = itertools.count(1)

    def resolve(self, tenant: str, name: str) -> AdapterEntry | None:
        """What `name` means to `tenant` (its own adapter first, then a shared one); None if it
        does not exist for this tenant or is still loading."""
        entry = self.owned.get(tenant, {}).get(name) or self.shared.get(name)
        return entry if entry is not None and entry.info is not None else None

    def visible(self, tenant: str) -> list[AdapterEntry]:
        own = self.owned.get(tenant, {})
        entries = [*own.values(), *(e for n, e in self.shared.items() if n not in own)]
        return [e for e in entries if e.info is not None]

    def all(self) -> list[AdapterEntry]:
        entries = [*self.shared.values()]
        for own in self.owned.values():
            entries.extend(own.values())
        return [e for e in entries if e.info is not None]

    def taken(self, owner: str | None, name: str) -> bool:
        """Whether `name` is already visible to `owner` (shared ones clash with everyone's)."""
        if owner is None:
            return name in self.shared or any(name in own for own in self.owned.values())
        return name in self.shared or name in self.owned.get(owner, {})

    def reserve(self, owner: str | None, name: str) -> AdapterEntry:
        """Claim `name` for a load in progress (invisible until `info` is set)."""
        if owner is None:
            entry = AdapterEntry(name, name, None)
            self.shared[name] = entry
        else:
            entry = AdapterEntry(name, f"{owner}/{name}@{next(self._loads)}", owner)
            self.owned.setdefault(owner, {})[name] = entry
        return entry

    def drop(self, entry: AdapterEntry) -> None:
        table = self.shared if entry.owner is None else self.owned.get(entry.owner, {})
        if table.get(entry.name) is entry:
            del table[entry.name]
