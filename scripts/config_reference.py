"""Write docs/config-reference.md from the config loaders themselves, so it cannot drift.

Every section loader reads its keys through `changeover.tables.Table`; this script loads a sample
changeover.toml that holds every section (and one element of every array of tables) while each
typed getter records the key it was asked for, its type and its default. The sample sets only
what is required, so the defaults recorded are the loaders' own. A key the loaders read is in
the reference; one they stop reading leaves it. `tests/examples/test_config_reference.py` fails
when the committed file differs from what this writes.

    .venv/bin/python scripts/config_reference.py          # rewrite docs/config-reference.md
    .venv/bin/python scripts/config_reference.py --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from changeover import config as config_mod  # noqa: E402
from changeover import tables  # noqa: E402

OUT = ROOT / "docs" / "config-reference.md"

# Required keys and one element of each array, nothing optional: what the loaders default is
# what the reference shows.
SAMPLE = """
[app]
command = ["node", "server.js"]
[env]
[proxy]
[proxy.tls]
acme = true
hosts = ["shop.example.com"]
[[proxy.tls.certificates]]
cert = "tls.pem"
key = "tls.key"
[releases]
[migrations]
[checks]
[checks.pre]
[[checks.pre.endpoints]]
path = "/health"
expect = {}
[[checks.pre.services]]
name = "payments"
tcp = "127.0.0.1:9"
[[checks.pre.services]]
name = "worker"
command = ["true"]
[[checks.pre.integrity]]
name = "no orphans"
sql = "SELECT true"
[checks.pre.connections]
green_pool = 10
[checks.version]
[[checks.smoke]]
path = "/"
json = {}
expect = { json = {} }
[[checks.flow]]
name = "checkout"
[[checks.flow.steps]]
path = "/login"
expect = {}
capture = { user = "user" }
[checks.session]
flow = "checkout"
verify = { path = "/me", expect = {} }
[monitor]
[notify]
[[notify.webhooks]]
url = "https://hooks.example.com/x"
[dashboard]
[fleet]
etcd = ["http://127.0.0.1:2379"]
[state]
[logs]
"""

# Defaults that depend on where changeover runs, or on another key, said in words.
DEFAULT_TEXT = {
    "fleet.name": "the host name",
    "proxy.workers": "the number of CPU cores",
    "proxy.max_header_bytes": "`65536`; `15360` with `engine = \"haproxy\"`",
    "migrations.database": "`${DATABASE_URL}`",
    "checks.pre.timeout": "`[checks] timeout`",
    "checks.pre.endpoints[].timeout": "`[checks] timeout`",
    "checks.pre.services[].timeout": "`[checks.pre] timeout`",
    "checks.pre.integrity[].timeout": "`[checks.pre] timeout`",
    "checks.pre.connections.timeout": "`[checks.pre] timeout`",
    "checks.version.path": "`[app] health_path`",
    "checks.version.timeout": "`[checks] timeout`",
    "checks.smoke[].timeout": "`[checks] timeout`",
    "checks.smoke[].name": "`\"METHOD path\"`",
    "checks.flow[].timeout": "`[checks] timeout`",
    "checks.flow[].steps[].timeout": "the flow's",
    "checks.flow[].steps[].name": "`\"METHOD path\"`",
    "checks.session.timeout": "the flow's timeout",
    "checks.session.verify.timeout": "`[checks.session] timeout`",
    "checks.session.verify.name": "`\"session verify\"`",
    "checks.pre.endpoints[].name": "`\"METHOD path\"`",
    "checks.pre.services[].name": "the address or the command",
    "checks.pre.integrity[].name": "`\"integrity #N\"`",
    "checks.smoke[].json": "", "checks.smoke[].expect.json": "",
}

# Where each section's keys are explained.
DOCS = {
    "app": "configuration.md", "env": "configuration.md", "proxy": "configuration.md",
    "releases": "getting-started.md", "migrations": "migrations.md", "checks": "checks.md",
    "monitor": "monitoring.md", "notify": "monitoring.md", "dashboard": "operations.md", "fleet": "operations.md",
    "state": "security.md", "logs": "security.md",
    "proxy.tls": "tls.md", "proxy.tls.certificates": "tls.md",
}

KIND = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "duration": "duration",
        "str_list": "list of strings", "str_map": "table of strings", "table": "table",
        "tables": "array of tables", "raw": "value"}

Record = dict[str, tuple[str, Any]]


def _normal(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path)


def record() -> Record:
    """Load SAMPLE with every Table getter recording (section.key -> (kind, default))."""
    seen: Record = {}
    originals: dict[str, Callable[..., Any]] = {}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def getter(self: tables.Table, key: str, *args: Any, **kw: Any) -> Any:
            full = _normal(self.key_name(key))
            if full not in seen:
                default = args[0] if args else kw.get("default", tables._MISSING)
                if name in ("table", "tables"):
                    default = None
                seen[full] = (name, default)
            return fn(self, key, *args, **kw)
        return getter

    for name in KIND:
        originals[name] = getattr(tables.Table, name)
        setattr(tables.Table, name, wrap(name, originals[name]))
    try:
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "changeover.toml"
            f.write_text(SAMPLE)
            for name in ("tls.pem", "tls.key"):    # [[proxy.tls.certificates]] names files that exist
                (Path(d) / name).write_text("")
            config_mod.load(f, environ={"DATABASE_URL": ""})
    finally:
        for name, fn in originals.items():
            setattr(tables.Table, name, fn)
    return seen


def _default(full: str, kind: str, value: Any) -> str:
    if full in DEFAULT_TEXT:
        return DEFAULT_TEXT[full]
    if value is tables._MISSING:
        return "required"
    if value is None or kind in ("table", "tables"):
        return ""
    if kind == "duration" and isinstance(value, int | float):
        v = float(value)
        if v and v % 3600 == 0:
            return f'`"{v / 3600:g}h"`'
        if v and v % 60 == 0:
            return f'`"{v / 60:g}m"`'
        return f'`"{v:g}s"`' if v >= 1 or v == 0 else f'`"{v * 1000:g}ms"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list | tuple):
        return "`[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def render(seen: Record) -> str:
    sections: dict[str, list[tuple[str, str, str]]] = {}
    for full, (kind, default) in seen.items():
        if "." not in full:
            continue   # the top-level tables themselves
        section, key = full.rsplit(".", 1)
        if kind in ("table", "tables") and any(k.startswith(full + ".") or k.startswith(full + "[].")
                                               for k in seen):
            continue   # a sub-table with keys of its own gets its own heading
        sections.setdefault(section, []).append((key, KIND[kind], _default(full, kind, default)))
    order = list(dict.fromkeys(s.split(".", 1)[0].split("[", 1)[0] for s in sections))
    names = list(sections)

    def rank(section: str) -> tuple[int, int, int, int]:
        # Each table after its parent: grouped by the section, then by its second-level table.
        top = section.split(".", 1)[0].split("[", 1)[0]
        second = ".".join(section.split(".")[:2])
        if "." not in section:
            return order.index(top), -1, 0, 0
        group = names.index(second) if second in sections else names.index(section)
        return order.index(top), group, section.count("."), names.index(section)

    ranked = sorted(sections.items(), key=lambda kv: rank(kv[0]))
    lines = [
        "# Configuration reference",
        "",
        "Every key of `changeover.toml`, its type and its default, as the loaders read them: this file is",
        "written by `scripts/config_reference.py` from the loaders themselves, and a test fails when it is",
        "out of date. What each key means is on the page linked under its section. Durations are",
        '`"500ms"`, `"30s"`, `"2m"`, `"1h"` or a number of seconds; strings may use `${VAR}` and',
        "`${VAR:-default}` (docs/configuration.md). An unknown key is an error.",
        "",
    ]
    if "env" in seen:
        lines += ["## `[env]`", "", "Explained in [configuration.md](configuration.md): any `KEY = \"value\"`, "
                  "passed to the app and recorded with each release.", ""]
    for section, keys in ranked:
        top = section.split(".", 1)[0].split("[", 1)[0]
        title = section.replace("[]", "")
        array = section.endswith("[]")
        head = f"[[{title}]]" if array else f"[{title}]"
        doc = DOCS.get(title, DOCS.get(top, "configuration.md"))
        lines += [f"## `{head}`", "", f"Explained in [{doc}]({doc}).", "",
                  "| key | type | default |", "|---|---|---|"]
        lines += [f"| `{k}` | {t} | {d} |" for k, t, d in keys]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    text = render(record())
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run .venv/bin/python scripts/config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
