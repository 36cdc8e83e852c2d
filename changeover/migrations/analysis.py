"""The linter's results: findings, per-statement plans, per-script analyses, and the context
carried from one migration to the next during a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from changeover.migrations.rules import LOCK_BLOCKS
from changeover.migrations.sqltext import POSTGRES


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

    @property
    def blocks(self) -> str:
        return LOCK_BLOCKS.get(self.lock, "unknown")

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "line": self.line, "column": self.col, "sql": self.sql, "kind": self.kind,
                "lock": self.lock, "blocks": self.blocks, "rewrites": self.rewrites, "phase": self.phase,
                "tables": self.tables, "backfill": self.backfill,
                "findings": [f.to_json() for f in self.findings]}


@dataclass
class ScriptAnalysis:
    path: str
    statements: list[StatementPlan]
    findings: list[Finding]    # every finding, including ignored ones and parse errors
    phase: str
    transaction: bool          # False: run statement by statement (CONCURRENTLY or directive)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error" and not f.ignored]

    @property
    def parse_error(self) -> Finding | None:
        return next((f for f in self.findings if f.rule == "parse-error"), None)


@dataclass
class LintContext:
    """What earlier migrations of the same run told us about the schema."""

    dialect: str = POSTGRES
    columns: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)  # -> (type, typmod)
    nn_checks: dict[str, tuple[str, str, bool]] = field(default_factory=dict)      # name -> table, col, valid
    statements: int = 0
