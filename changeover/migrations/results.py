"""What the migrate verbs return: plain dataclasses, each with `to_json()` (the --json output)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from changeover.migrations.engine import StepResult
from changeover.migrations.formats import Migration
from changeover.migrations.lint import Finding, ScriptAnalysis


@dataclass
class Stop:
    version: str
    name: str
    phase: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "name": self.name, "phase": self.phase, "reason": self.reason}


@dataclass
class ApplyResult:
    applied: list[StepResult] = field(default_factory=list)
    stopped_at: Stop | None = None     # `safe`: the first contract/unsafe migration, not applied
    pending: int = 0                   # still pending after this run
    release: str | None = None
    source: str | None = None          # the directory the migrations were read from
    contract_pending: list[str] = field(default_factory=list)  # contract migrations left for `contract`

    def to_json(self) -> dict[str, Any]:
        return {"applied": [s.to_json() for s in self.applied],
                "stopped_at": self.stopped_at.to_json() if self.stopped_at else None,
                "pending": self.pending, "release": self.release, "source": self.source,
                "contract_pending": self.contract_pending}


@dataclass
class RollbackResult:
    rolled_back: list[StepResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"rolled_back": [s.to_json() for s in self.rolled_back]}


@dataclass
class MigrationStatus:
    version: str
    name: str
    state: str              # applied | backfilling | dirty | pending | missing (applied, file gone)
    phase: str
    drifted: bool = False   # applied, and the file changed since
    applied_at: str | None = None
    release: str | None = None
    failed: str | None = None   # dirty: which statement failed, and why

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "name": self.name, "state": self.state, "phase": self.phase,
                "drifted": self.drifted, "applied_at": self.applied_at, "release": self.release,
                "failed": self.failed}


@dataclass
class StatusResult:
    database: str
    migrations: list[MigrationStatus]
    source: str = ""    # the directory the migrations were read from
    origin: str = ""    # why that one ([migrations] dir, the live release...)

    @property
    def pending(self) -> list[MigrationStatus]:
        return [m for m in self.migrations if m.state == "pending"]

    @property
    def dirty(self) -> list[MigrationStatus]:
        return [m for m in self.migrations if m.state == "dirty"]

    def to_json(self) -> dict[str, Any]:
        return {"database": self.database, "source": self.source, "origin": self.origin,
                "migrations": [m.to_json() for m in self.migrations], "pending": len(self.pending),
                "dirty": len(self.dirty), "drifted": sum(m.drifted for m in self.migrations)}


@dataclass
class PlannedMigration:
    migration: Migration
    analysis: ScriptAnalysis
    action: str   # what `safe` would do: apply | stop (contract) | refuse (unsafe) | after-stop

    def to_json(self) -> dict[str, Any]:
        m, a = self.migration, self.analysis
        return {"version": m.version, "name": m.name, "file": str(m.up.path), "format": m.format,
                "phase": a.phase, "transaction": a.transaction, "safe_action": self.action,
                "backfills": [{"table": b.table, "batch": b.batch, "key": b.key} for b in m.up.directives.backfills],
                "statements": [s.to_json() for s in a.statements],
                "locks": [h.to_json() for h in a.held],
                "tables": [t.to_json() for t in a.sizes.values()],
                "findings": [f.to_json() for f in a.findings if f.statement == 0]}


@dataclass
class PlanResult:
    database: str
    dialect: str
    pending: list[PlannedMigration]

    def to_json(self) -> dict[str, Any]:
        return {"schema": "changeover.migrate.plan/1", "database": self.database, "dialect": self.dialect,
                "pending": [p.to_json() for p in self.pending],
                "safe_applies": [p.migration.version for p in self._safe()],
                "safe_stops_at": next((p.migration.version for p in self.pending if p.action != "apply"), None)}

    def _safe(self) -> list[PlannedMigration]:
        out = []
        for p in self.pending:
            if p.action != "apply":
                break
            out.append(p)
        return out


@dataclass
class LintResult:
    files: int
    statements: int
    findings: list[Finding]
    seconds: float

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error" and not f.ignored]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {"schema": "changeover.migrate.lint/1", "files": self.files, "statements": self.statements,
                "errors": len(self.errors),
                "warnings": sum(f.severity == "warning" and not f.ignored for f in self.findings),
                "findings": [f.to_json() for f in self.findings]}
