"""Write loraplex's --tenants file from a tenants file without keys and a folder of key files.

    python render_tenants.py TENANTS.toml KEYS_DIR OUT.toml

TENANTS.toml has loraplex's `[[tenants]]` tables without `api_keys` (it lives in a ConfigMap);
KEYS_DIR/<tenant name> holds that tenant's API keys, one a line (a Secret mounted as a folder).
OUT.toml is the file `loraplex serve --tenants` reads (README "Tenants"), written mode 0600.
Exits non-zero with the reason when a tenant has no key or a table has keys it should not.
Standard library only: it runs in the server's image before the server starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the images have 3.12)
    import tomli as tomllib

ALLOWED = {"name", "admin", "adapters"}  # api_keys come from KEYS_DIR


def toml_str(s: str) -> str:
    """A TOML basic string."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\U{ord(c):08X}")
    return '"' + "".join(out) + '"'


def render(tenants_file: Path, keys_dir: Path) -> str:
    data = tomllib.loads(tenants_file.read_text(encoding="utf-8"))
    if set(data) - {"tenants"}:
        raise ValueError(
            f"{tenants_file}: unknown top-level keys {sorted(set(data) - {'tenants'})}"
        )
    lines = []
    for i, t in enumerate(data.get("tenants", [])):
        name = t.get("name")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"{tenants_file}: tenants[{i}]: a 'name' is needed, got {name!r}")
        extra = set(t) - ALLOWED
        if extra:
            where = "the Secret" if extra == {"api_keys"} else "loraplex's tenants format"
            raise ValueError(f"{tenants_file}: tenant {name!r}: {sorted(extra)} (see {where})")
        key_file = keys_dir / name
        keys = []
        if key_file.is_file():
            keys = [k.strip() for k in key_file.read_text(encoding="utf-8").splitlines()]
            keys = [k for k in keys if k]
        if not keys:
            raise ValueError(f"tenant {name!r}: no API key in {key_file}")
        lines += ["[[tenants]]", f"name = {toml_str(name)}"]
        lines.append("api_keys = [" + ", ".join(map(toml_str, keys)) + "]")
        if "admin" in t:
            lines.append(f"admin = {'true' if t['admin'] is True else 'false'}")
        if t.get("adapters"):
            pairs = (f"{toml_str(k)} = {toml_str(v)}" for k, v in t["adapters"].items())
            lines.append("adapters = { " + ", ".join(pairs) + " }")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        text = render(Path(argv[0]), Path(argv[1]))
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
        print(f"render_tenants: {e}", file=sys.stderr)
        return 1
    fd = os.open(argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
