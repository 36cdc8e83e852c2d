"""Finding migrations on disk, in the layouts projects already use, and their directives.

    native / golang-migrate   0001_add_orders.up.sql + 0001_add_orders.down.sql
    diesel                    2024-01-01-120000_add_orders/up.sql + down.sql
    dbmate                    20240101120000_add_orders.sql with `-- migrate:up` / `-- migrate:down`
    flyway                    V1.1__add_orders.sql + U1.1__add_orders.sql (undo), dotted versions

Versions compare as dotted numbers (`1.10` after `1.9`; `0001` is `1`): `version_key` is the one
ordering and `norm` the one spelling used as a key in the history.

Directives are SQL comments, so the files stay valid for every other tool:
`-- changeover:phase expand|contract`, `-- changeover:transaction off`,
`-- changeover:ignore RULE reason...`, `-- changeover:backfill table=T [batch=N] [pause=D] [key=COL]`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from changeover.errors import MigrationError
from changeover.tables import parse_duration

NATIVE, DIESEL, DBMATE, FLYWAY = "native", "diesel", "dbmate", "flyway"
PHASES = ("expand", "contract")
VERSION = re.compile(r"^\d+(?:[._]\d+)*$")

_NATIVE = re.compile(r"^(\d+)_(.+)\.(up|down)\.sql$")
_DIESEL = re.compile(r"^(\d[\d-]*)_(.+)$")
_DBMATE = re.compile(r"^(\d+)_(.+)\.sql$")
_DIRECTIVE = re.compile(r"^[ \t]*--[ \t]*changeover:(\S*)[ \t]*(.*?)[ \t]*$", re.M)
_DBMATE_MARK = re.compile(r"^[ \t]*--[ \t]*migrate:(up|down)\b(.*)$", re.M)
_FLYWAY = re.compile(r"^([VU])(\d+(?:[._]\d+)*)__(.+)\.sql$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$.]*$")


@dataclass(frozen=True)
class Backfill:
    table: str
    batch: int | None = None   # None: [migrations] batch_size
    pause: float | None = None
    key: str | None = None     # None: the table's primary key (SQLite: rowid)
    line: int = 0


@dataclass(frozen=True)
class Directives:
    phase: str | None = None
    transaction: bool | None = None          # None: decided by the statements (CONCURRENTLY)
    # (line, rule, reason) of each ignore: above the first statement it covers the file, else the next statement
    ignores: tuple[tuple[int, str, str], ...] = ()
    backfills: tuple[Backfill, ...] = ()


@dataclass(frozen=True)
class Script:
    path: Path
    text: str              # the section that runs
    line_offset: int = 0   # lines before the section in its file (dbmate)
    directives: Directives = field(default_factory=Directives)


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    format: str
    up: Script
    down: Script | None

    @property
    def id(self) -> str:
        return f"{self.version}_{self.name}"

    @property
    def checksum(self) -> str:
        # only what runs on the way up: fixing a down script later is legitimate
        return hashlib.sha256(self.up.text.encode()).hexdigest()

    @property
    def key(self) -> str:
        return norm(self.version)

    @property
    def sort_key(self) -> tuple[tuple[int, ...], str]:
        return version_key(self.version), self.name


def version_key(version: str) -> tuple[int, ...]:
    """'0001' -> (1,), '1.10' -> (1, 10), '2024-01-01-120000' -> (20240101120000,)."""
    return tuple(int(p) for p in version.replace("-", "").replace("_", ".").split("."))


def norm(version: str) -> str:
    """The one spelling of a version used as a key: leading zeros dropped, '.' between parts."""
    return ".".join(str(p) for p in version_key(version))


def parse_directives(text: str, path: Path, line_offset: int = 0) -> Directives:
    phase: str | None = None
    transaction: bool | None = None
    ignores: list[tuple[int, str, str]] = []
    backfills: list[Backfill] = []
    for m in _DIRECTIVE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1 + line_offset
        where = f"{path}:{line}:1"
        verb, arg = m.group(1), m.group(2)
        if verb == "phase":
            if arg not in PHASES:
                raise MigrationError(f"{where}: changeover:phase expects expand or contract, got {arg!r}")
            phase = arg
        elif verb == "transaction":
            if arg not in ("on", "off"):
                raise MigrationError(f"{where}: changeover:transaction expects on or off, got {arg!r}")
            transaction = arg == "on"
        elif verb == "ignore":
            rule, _, reason = arg.partition(" ")
            if not rule or not reason.strip():
                raise MigrationError(f"{where}: changeover:ignore expects a rule id and a reason, "
                                     "e.g. `-- changeover:ignore index-not-concurrent table has 20 rows`")
            ignores.append((line, rule, reason.strip()))
        elif verb == "backfill":
            backfills.append(_backfill(arg, where, line))
        else:
            raise MigrationError(f"{where}: unknown directive changeover:{verb} "
                                 "(expected phase, transaction, ignore or backfill)")
    return Directives(phase, transaction, tuple(ignores), tuple(backfills))


def _backfill(arg: str, where: str, line: int) -> Backfill:
    opts: dict[str, str] = {}
    for part in arg.split():
        k, sep, v = part.partition("=")
        if not sep or k not in ("table", "batch", "pause", "key") or not v:
            raise MigrationError(f"{where}: changeover:backfill expects table=T [batch=N] [pause=D] [key=COL], "
                                 f"got {part!r}")
        opts[k] = v
    if "table" not in opts:
        raise MigrationError(f"{where}: changeover:backfill needs table=NAME")
    for k in ("table", "key"):
        if k in opts and not _IDENT.match(opts[k]):
            raise MigrationError(f"{where}: changeover:backfill {k}= expects an identifier, got {opts[k]!r}")
    try:
        batch = int(opts["batch"]) if "batch" in opts else None
        if batch is not None and batch < 1:
            raise ValueError
    except ValueError:
        raise MigrationError(f"{where}: changeover:backfill batch= expects a positive integer") from None
    try:
        pause = parse_duration(opts["pause"]) if "pause" in opts else None
    except ValueError as e:
        raise MigrationError(f"{where}: changeover:backfill pause= expects {e}") from None
    return Backfill(opts["table"].lower(), batch, pause, opts.get("key"), line)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MigrationError(f"{path}: is not UTF-8 text") from None
    except OSError as e:
        raise MigrationError(f"{path}: cannot read: {e.strerror}") from None


def script(path: Path, text: str | None = None, line_offset: int = 0) -> Script:
    text = _read(path) if text is None else text
    return Script(path, text, line_offset, parse_directives(text, path, line_offset))


def split_dbmate(path: Path, text: str) -> tuple[Script, Script | None]:
    marks = list(_DBMATE_MARK.finditer(text))
    ups = [m for m in marks if m.group(1) == "up"]
    if len(ups) != 1:
        raise MigrationError(f"{path}: expected exactly one `-- migrate:up` line")
    sections: dict[str, Script] = {}
    for i, m in enumerate(marks):
        body_start = m.end() + 1 if m.end() < len(text) else m.end()
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        offset = text.count("\n", 0, body_start)
        sc = script(path, text[body_start:end], offset)
        if "transaction:false" in m.group(2).replace(" ", ""):  # dbmate's own spelling
            sc = Script(sc.path, sc.text, sc.line_offset, replace(sc.directives, transaction=False))
        sections[m.group(1)] = sc
    return sections["up"], sections.get("down")


def discover(directory: Path, origin: str | None = None) -> list[Migration]:
    """Every migration under `directory`, oldest first. Layouts may be mixed; versions must be unique.
    origin: where the directory comes from, for the error when it is missing."""
    if not directory.is_dir():
        where = f" ({origin})" if origin else ""
        raise MigrationError(f"migrations directory {directory}{where} does not exist "
                             "(create it, run `changeover migrate new NAME`, or set [migrations] dir)")
    found: dict[str, Migration] = {}
    natives: dict[tuple[str, str], dict[str, Path]] = {}
    flyway: dict[tuple[str, str], dict[str, Path]] = {}

    def add(m: Migration) -> None:
        other = found.get(m.key)
        if other is not None:
            raise MigrationError(f"{m.up.path}: version {m.version} is also used by {other.up.path}")
        found[m.key] = m

    for p in sorted(directory.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            dm = _DIESEL.match(p.name)
            if dm and (p / "up.sql").is_file():
                down_file = p / "down.sql"
                add(Migration(dm.group(1).replace("-", ""), dm.group(2), DIESEL, script(p / "up.sql"),
                              script(down_file) if down_file.is_file() else None))
            continue
        if not p.name.endswith(".sql"):
            continue
        nm = _NATIVE.match(p.name)
        if nm:
            natives.setdefault((nm.group(1), nm.group(2)), {})[nm.group(3)] = p
            continue
        fm = _FLYWAY.match(p.name)
        if fm:
            flyway.setdefault((fm.group(2).replace("_", "."), fm.group(3)), {})[fm.group(1)] = p
            continue
        if p.name.startswith("R__"):
            raise MigrationError(f"{p}: Flyway's repeatable migrations (R__) are not supported; "
                                 "give it a version (V<version>__name.sql)")
        bm = _DBMATE.match(p.name)
        if not bm:
            raise MigrationError(f"{p}: cannot tell the version from the name (expected 0001_name.up.sql, "
                                 "0001_name.down.sql, 20240101120000_name.sql or V1.1__name.sql)")
        up, down = split_dbmate(p, _read(p))
        add(Migration(bm.group(1), bm.group(2), DBMATE, up, down))
    for (version, name), files in natives.items():
        if "up" not in files:
            raise MigrationError(f"{files['down']}: has no matching {version}_{name}.up.sql")
        add(Migration(version, name, NATIVE, script(files["up"]),
                      script(files["down"]) if "down" in files else None))
    for (version, name), files in flyway.items():
        if "V" not in files:
            raise MigrationError(f"{files['U']}: has no matching V{version}__{name}.sql")
        add(Migration(version, name, FLYWAY, script(files["V"]), script(files["U"]) if "U" in files else None))
    return sorted(found.values(), key=lambda m: m.sort_key)


def detect_layout(migrations: list[Migration]) -> str:
    """The layout a new migration should follow: the one the directory already uses."""
    return migrations[-1].format if migrations else NATIVE
