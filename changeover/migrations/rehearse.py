"""Rehearse a schema rollback without doing it (`changeover drill`).

For the migrations a release applied (newest first, as a rollback would take them), check what
`rollback` checks before it undoes anything: the file is still there, it has a down script, the
down script parses, and it would destroy no data. Then, on PostgreSQL, run the transactional
down scripts for real, one after the other in one transaction that is always rolled back: a down
script that fails on the real schema (a typo in a column name, a dependency it forgot) is found
now, not during an incident. The rehearsal holds the locks its statements take only for as long
as they run, with `[migrations] lock_timeout` and `statement_timeout`, so a busy table makes it
fail fast instead of queueing users behind it.

A down script that runs without a transaction (CONCURRENTLY, `transaction off`) cannot be rolled
back, so it is checked but not run, and the scripts older than it are not run either (they would
run on a schema it had not restored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from changeover.migrations import history
from changeover.migrations.dataloss import data_loss
from changeover.migrations.db import Conn, describe
from changeover.migrations.engine import DB_ERRORS, _in_transaction
from changeover.migrations.formats import Migration, norm, version_key
from changeover.migrations.lint import LintContext, ScriptAnalysis, analyze
from changeover.migrations.lock import runner_lock
from changeover.migrations.source import database_for, discover

if TYPE_CHECKING:
    from changeover.config import Config


@dataclass
class Checked:
    """One migration's down script, as rehearsed."""

    id: str
    ok: bool
    detail: str
    ran: bool = False          # executed in the rolled-back transaction

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "ok": self.ok, "detail": self.detail, "ran": self.ran}


@dataclass
class Rehearsal:
    release: str
    database: str
    checked: list[Checked] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checked)

    @property
    def problems(self) -> list[str]:
        return [f"{c.id}: {c.detail}" for c in self.checked if not c.ok]

    def summary(self) -> str:
        if not self.checked:
            return f"{self.release} applied no migrations: nothing to roll back"
        if not self.ok:
            return "; ".join(self.problems)
        ran = sum(c.ran for c in self.checked)
        return (f"{len(self.checked)} down script{'s' if len(self.checked) > 1 else ''} of {self.release} "
                f"checked, {ran} run in a rolled-back transaction")

    def to_json(self) -> dict[str, Any]:
        return {"release": self.release, "database": self.database, "ok": self.ok,
                "checked": [c.to_json() for c in self.checked]}


def rehearse(config: Config, release: str, *, release_dir: str | Path | None = None,
             database_url: str | None = None) -> Rehearsal:
    """Check (and on PostgreSQL run, then roll back) the down scripts of what `release` applied."""
    cfg = config.migrations
    db = database_for(config, database_url)
    src, ms = discover(config, release_dir)
    by_key = {m.key: m for m in ms}
    out = Rehearsal(release, db.display)
    with runner_lock(db, wait=False):
        conn = db.connect("rollback rehearsal", cfg.lock_timeout)
        try:
            applied = history.load(conn, cfg.table)
            mine = sorted((h for h in applied.values() if h.release == release
                           and h.state in ("applied", "backfilling")),
                          key=lambda h: version_key(h.version), reverse=True)
            plans: list[tuple[Migration, ScriptAnalysis, Checked]] = []
            for h in mine:
                m = by_key.get(norm(h.version))
                if m is None:
                    out.checked.append(Checked(h.id, False, f"applied, but its file is gone from {src.dir}"))
                    continue
                if m.down is None:
                    out.checked.append(Checked(m.id, False, "no down script: it cannot be rolled back"))
                    continue
                a = analyze(m.down, LintContext(db.dialect))
                syntax = [(f.line, f.col, f.message) for f in [a.parse_error] if f is not None]
                syntax += [(st.line, st.col, err) for st in a.statements if st.node is None
                           for err in [conn.syntax_error(st.sql)] if err]
                if syntax:
                    line, col, msg = syntax[0]
                    out.checked.append(Checked(m.id, False, f"{m.down.path}:{line}:{col}: syntax error: {msg}"))
                    continue
                lost = data_loss(conn, a)
                if lost:
                    out.checked.append(Checked(m.id, False, f"its down script would destroy data ({', '.join(lost)} "
                                                            "hold values): a rollback needs --allow-data-loss"))
                    continue
                c = Checked(m.id, True, "exists, parses, destroys no data")
                out.checked.append(c)
                plans.append((m, a, c))
            # the scripts run in order on what the newer ones left: only when every one passed
            if conn.pg and plans and len(plans) == len(out.checked):
                _run_rolled_back(conn, cfg.lock_timeout, cfg.statement_timeout, plans)
        finally:
            conn.close()
    return out


def _run_rolled_back(conn: Conn, lock_timeout: float, statement_timeout: float,
                     plans: list[tuple[Migration, ScriptAnalysis, Checked]]) -> None:
    """Run the down scripts newest first in one transaction, then roll it back, whatever happened."""
    conn.begin()
    try:
        conn.set_timeouts(lock_timeout, statement_timeout, local=True)
        for m, a, c in plans:
            if not a.transaction:
                c.detail += "; not run: it runs without a transaction (and so are the older ones)"
                return
            assert m.down is not None
            for st, sqls in _in_transaction(a, str(m.down.path)).steps:
                try:
                    for sql in sqls:
                        conn.execute(sql)
                except DB_ERRORS as e:
                    c.ok = False
                    c.detail = (f"{m.down.path}:{st.line}:{st.col}: failed when run (in a transaction that was "
                                f"rolled back): {describe(e)}")
                    return
            c.ran = True
            c.detail += "; ran and was rolled back"
    finally:
        conn.rollback()
