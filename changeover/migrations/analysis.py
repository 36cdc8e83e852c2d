"""The linter's results: findings, per-statement plans, per-script analyses, and the context
carried from one migration to the next during a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from changeover.migrations.rules import LOCK_BLOCKS
from changeover.migrations.sqltext import POSTGRES

DEFAULT_BACKFILL_THRESHOLD = 10_000   # rows an unbatched UPDATE/DELETE may touch before it is an error


@dataclass
class Finding:
    rule: str
    severity: str
    phase: str
    file: str
    line: int
    col: int
    message: str
    recipe: str
    statement: int = 0            # 1-based index in its script, 0: the script as a whole
    ignored: str | None = None    # the reason from `-- changeover:ignore`

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "severity": self.severity, "phase": self.phase, "file": self.file,
                "line": self.line, "column": self.col, "message": self.message, "recipe": self.recipe,
                "statement": self.statement, "ignored": self.ignored}

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.severity} [{self.rule}] {self.message}"


@dataclass
class StatementPlan:
    index: int
    line: int
    col: int
    sql: str
    kind: str
    lock: str
    rewrites: bool
    phase: str
    tables: list[str]
    findings: list[Finding]
    backfill: bool = False
    concurrent: bool = False
    node: Any = None
    slow: str | None = None        # why it takes long on a full table (scan, rewrite, index build, rows)
    no_transaction: str | None = None  # what PostgreSQL refuses inside a transaction block

    @property
    def blocks(self) -> str:
        return LOCK_BLOCKS.get(self.lock, "unknown")

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "line": self.line, "column": self.col, "sql": self.sql, "kind": self.kind,
                "lock": self.lock, "blocks": self.blocks, "rewrites": self.rewrites, "phase": self.phase,
                "tables": self.tables, "backfill": self.backfill, "slow": self.slow,
                "findings": [f.to_json() for f in self.findings]}


@dataclass(frozen=True)
class HeldLock:
    """The strongest lock a migration holds on one table, from the statement that takes it to commit."""
    table: str
    lock: str
    since: int      # statement index that takes it
    line: int
    until: int      # last statement index it is held through (the commit follows it)

    @property
    def statements(self) -> int:
        return self.until - self.since + 1

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "lock": self.lock, "blocks": LOCK_BLOCKS.get(self.lock, "unknown"),
                "since_statement": self.since, "line": self.line, "until_statement": self.until,
                "statements": self.statements}


@dataclass(frozen=True)
class TableSize:
    name: str
    exists: bool
    rows: int | None     # estimate; 0 only when known empty; None: unknown (never analysed, not empty)
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"table": self.name, "exists": self.exists, "rows": self.rows, "bytes": self.bytes}

    def __str__(self) -> str:
        if not self.exists:
            return f"{self.name}: not in the database yet"
        rows = "unknown rows" if self.rows is None else f"~{self.rows:,} rows"
        return f"{self.name}: {rows}, {_size(self.bytes)}"


def _size(n: int) -> str:
    x = float(n)
    for unit in ("bytes", "kB", "MB"):
        if x < 1024:
            return f"{n} bytes" if unit == "bytes" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} GB"


class SizeSource(Protocol):
    """What a connected database tells the linter (changeover.migrations.sizes.Sizes)."""

    def table(self, name: str) -> TableSize: ...

    def estimate(self, sql: str) -> int | None: ...

    def volatility(self, function: str) -> str | None: ...


@dataclass
class ScriptAnalysis:
    path: str
    statements: list[StatementPlan]
    findings: list[Finding]    # every finding, including ignored ones and parse errors
    phase: str
    transaction: bool          # False: run statement by statement (CONCURRENTLY or directive)
    held: list[HeldLock] = field(default_factory=list)
    sizes: dict[str, TableSize] = field(default_factory=dict)   # tables touched, when a database was read

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error" and not f.ignored]

    @property
    def parse_error(self) -> Finding | None:
        return next((f for f in self.findings if f.rule == "parse-error"), None)


@dataclass
class LintContext:
    """What earlier migrations of the same run told us about the schema (and the database, if read)."""

    dialect: str = POSTGRES
    columns: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)  # -> (type, typmod)
    nn_checks: dict[str, tuple[str, str, bool]] = field(default_factory=dict)      # name -> table, col, valid
    statements: int = 0
    keys: dict[str, set[str]] = field(default_factory=dict)   # table -> single columns that are unique
    not_null: set[tuple[str, str]] = field(default_factory=set)  # columns made NOT NULL by ALTER
    sizes: SizeSource | None = None
    backfill_threshold: int = DEFAULT_BACKFILL_THRESHOLD
    # tables this run creates (absent from the database): 0 rows until a statement of the run writes some
    run_tables: dict[str, int | None] = field(default_factory=dict)

    def snapshot(self) -> LintContext:
        """A copy for a down script: it sees the schema as its up script left it, and changes nothing."""
        return LintContext(self.dialect, dict(self.columns), dict(self.nn_checks), 0,
                           {k: set(v) for k, v in self.keys.items()}, set(self.not_null), self.sizes,
                           self.backfill_threshold, dict(self.run_tables))
