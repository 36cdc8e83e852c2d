"""Judging the statements beyond CREATE/ALTER TABLE: indexes, drops, renames, data changes,
maintenance commands, explicit locks and DO blocks.

HARMLESS lists statements that only create something new or change metadata no running code
depends on, with the lock they take; HANDLERS judge the rest. Anything in neither is unjudged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pglast
from pglast.parser import ParseError

from changeover.migrations import plpgsql
from changeover.migrations.analysis import StatementPlan
from changeover.migrations.rules import LOCK_BLOCKS, blocks_writes, strongest_lock
from changeover.migrations.sqltext import Statement

if TYPE_CHECKING:
    from changeover.migrations.lint import Analyzer

AE, SUE, SHARE = "ACCESS EXCLUSIVE", "SHARE UPDATE EXCLUSIVE", "SHARE"

HARMLESS: dict[str, str] = {
    "CommentStmt": SUE, "GrantStmt": "none", "GrantRoleStmt": "none", "CreateRoleStmt": "none",
    "AlterRoleStmt": "none", "AlterDefaultPrivilegesStmt": "none", "AlterOwnerStmt": "none",
    "CreateSeqStmt": "none", "AlterSeqStmt": "none", "CreateExtensionStmt": "none", "ViewStmt": "none",
    "CreateFunctionStmt": "none", "AlterFunctionStmt": "none", "CreateEnumStmt": "none",
    "CompositeTypeStmt": "none", "CreateDomainStmt": "none", "CreateRangeStmt": "none", "DefineStmt": "none",
    "CreateCastStmt": "none", "CreateSchemaStmt": "none", "VariableSetStmt": "none",
    "CreatePolicyStmt": AE, "AlterPolicyStmt": AE, "CreateStatsStmt": SUE, "CreateEventTrigStmt": "none",
    "NotifyStmt": "none", "ExplainStmt": "none", "CheckPointStmt": "none", "DiscardStmt": "none",
    "SecLabelStmt": "none", "CreateForeignServerStmt": "none", "CreateUserMappingStmt": "none",
    "CreateFdwStmt": "none", "CreateConversionStmt": "none", "CreatePLangStmt": "none",
    "CreateAmStmt": "none", "CreateOpClassStmt": "none", "CreateOpFamilyStmt": "none",
    "CreateTransformStmt": "none", "CreateForeignTableStmt": "none", "ReassignOwnedStmt": "none",
    "AlterStatsStmt": SUE, "ListenStmt": "none", "UnlistenStmt": "none",
}
# LockStmt.mode (lockdefs.h) -> lock name
LOCK_MODES = {1: "ACCESS SHARE", 2: "ROW SHARE", 3: "ROW EXCLUSIVE", 4: SUE, 5: SHARE,
              6: "SHARE ROW EXCLUSIVE", 7: "EXCLUSIVE", 8: AE}


def rename(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    what = str(node.renameType.name).removeprefix("OBJECT_").lower()
    table = a.rel(node.relation)
    p.tables, p.lock = [table] if table else [], AE
    if table in a.created:
        p.lock = "none"
        return
    if what == "column":
        a.f(p, "renaming-column", st, f"renaming {table}.{node.subname} to {node.newname} breaks the "
            "running code at once")
    elif what == "table":
        a.f(p, "renaming-table", st, f"renaming table {table} to {node.newname} breaks the running "
            "code at once")
    elif what in ("index", "tabconstraint", "trigger", "policy", "rule", "role", "statistic_ext"):
        p.lock = SUE if what == "index" else p.lock   # code does not name these (ON CONFLICT uses columns)
    else:
        old = table or ".".join(_names(node.object))
        a.f(p, "renaming-object", st, f"renaming {what.replace('_', ' ')} {old} to {node.newname} breaks "
            "the running code that uses the old name at once")


def _names(obj: Any) -> list[str]:
    from changeover.migrations.lint import name_of
    if obj is None:
        return []
    if isinstance(obj, tuple | list):
        return [name_of(x) for x in obj]
    inner = getattr(obj, "objname", None) or getattr(obj, "names", None)
    return [name_of(x) for x in inner] if inner else [name_of(obj)]


def _single_row(a: Analyzer, table: str, where: Any) -> bool:
    """WHERE key = constant (AND ...), with key a single-column PRIMARY KEY/UNIQUE we saw created."""
    from changeover.migrations.lint import name_of
    keys = a.ctx.keys.get(table, set())
    terms = [where]
    if type(where).__name__ == "BoolExpr" and str(where.boolop.name) == "AND_EXPR":
        terms = list(where.args)
    for t in terms:
        if type(t).__name__ != "A_Expr" or str(t.kind.name) != "AEXPR_OP" or name_of(t.name[-1]) != "=":
            continue
        sides = (t.lexpr, t.rexpr)
        col = next((s for s in sides if type(s).__name__ == "ColumnRef"), None)
        const = next((s for s in sides if type(s).__name__ in ("A_Const", "ParamRef", "TypeCast")), None)
        if col is not None and const is not None and name_of(col.fields[-1]).lower() in keys:
            return True
    return False


def dml(a: Analyzer, table: str, node: Any, st: Statement, p: StatementPlan, verb: str) -> None:
    p.tables, p.lock = [table], "ROW EXCLUSIVE"
    if table in a.created:
        return
    if table in a.backfill_tables and not a.nested:
        p.backfill = True   # runs after the commit, in primary-key batches
        return
    rows: int | None = None
    how = ""
    if node.whereClause is not None and _single_row(a, table, node.whereClause):
        rows, how = 1, "WHERE on a unique key"
    elif table in a.ctx.run_tables:
        rows, how = a.ctx.run_tables[table], "created in this run"
    elif a.ctx.sizes is not None:
        rows, how = a.ctx.sizes.estimate(st.text), "EXPLAIN"
        s = a.size(table)
        if rows is None and s is not None and s.exists:
            rows, how = s.rows, "pg_class"
    limit = a.ctx.backfill_threshold
    est = f" (~{rows:,} rows by {how})" if rows is not None else ""
    msg = (f"{verb} of existing table {table}{est} in one transaction holds row locks on every row it touches "
           "until the migration commits")
    if rows is not None and rows <= limit:
        f = a.finding("unbatched-backfill", st, p.index, f"{msg}; at most {limit:,} rows (backfill threshold)")
        p.findings.append(replace(f, severity="notice", phase="expand"))
        return
    p.slow = f"{verb} of {table}{est}"
    unknown = "; its size is unknown here: `migrate plan` or `lint --database` estimate it" \
        if rows is None and a.ctx.sizes is None else ""
    a.f(p, "unbatched-backfill", st, msg + unknown)


def _index(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    table = a.rel(node.relation)
    p.tables, p.concurrent = [table], bool(node.concurrent)
    if node.unique and len(node.indexParams or ()) == 1 and node.indexParams[0].name and not node.whereClause:
        a.ctx.keys.setdefault(table, set()).add(str(node.indexParams[0].name).lower())
    if table in a.created:
        return
    p.lock = SUE if node.concurrent else SHARE
    if node.concurrent:
        check_tx(a, st, p)
    else:
        p.slow = f"CREATE INDEX on {table}"
        a.f(p, "index-not-concurrent", st, f"CREATE INDEX on {table} blocks writes for the whole build")


def check_tx(a: Analyzer, st: Statement, p: StatementPlan) -> None:
    if a.in_tx_block or a.script.directives.transaction is True or a.nested:
        a.f(p, "concurrently-in-transaction", st, "CONCURRENTLY cannot run inside a transaction block")


def _drop(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    from changeover.migrations.lint import name_of
    what = str(node.removeType.name).removeprefix("OBJECT_").lower()
    names = [".".join(name_of(x) for x in (o if isinstance(o, tuple | list) else (o,))).lower()
             for o in node.objects or ()]
    p.tables = [n.split(".")[-1] for n in names] if what == "table" else []
    p.concurrent = bool(node.concurrent)
    if what == "table":
        for n in p.tables:
            a.ctx.run_tables.pop(n, None)
        if all(n in a.created for n in p.tables):
            return
        p.lock = AE
        a.f(p, "dropping-table", st, f"drops table {', '.join(names)}")
    elif what == "index":
        p.lock = SUE if node.concurrent else AE
        if node.concurrent:
            check_tx(a, st, p)
        else:
            a.f(p, "drop-index-not-concurrent", st,
                f"DROP INDEX {', '.join(names)} takes ACCESS EXCLUSIVE on its table")
    else:
        p.lock = AE
        a.f(p, "dropping-object", st, f"drops {what.replace('_', ' ')} {', '.join(names)}")


def _reindex(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    conc = any(getattr(o, "defname", "") == "concurrently" for o in node.params or ())
    p.concurrent = conc
    p.lock = SUE if conc else SHARE
    kind = str(node.kind.name).removeprefix("REINDEX_OBJECT_")
    if kind in ("SCHEMA", "SYSTEM", "DATABASE"):
        p.no_transaction = f"REINDEX {kind}"
    if conc:
        check_tx(a, st, p)
    else:
        p.slow = "REINDEX"
        a.f(p, "reindex-not-concurrent", st, "REINDEX blocks writes while it rebuilds")


def _truncate(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    p.tables = [a.rel(r) for r in node.relations or ()]
    old = [t for t in p.tables if t not in a.created]
    if not old:
        return
    p.lock = AE
    a.f(p, "truncating-table", st, f"TRUNCATE {', '.join(old)} deletes every row at once under ACCESS "
        "EXCLUSIVE: the running code loses its data")


def _lock(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    mode = LOCK_MODES.get(int(node.mode), AE)
    p.tables = [a.rel(r) for r in node.relations or ()]
    old = [t for t in p.tables if t not in a.created]
    if not old:
        return
    p.lock = mode
    if blocks_writes(mode):
        a.f(p, "locking-table", st, f"LOCK TABLE {', '.join(old)} IN {mode} MODE blocks {LOCK_BLOCKS[mode]} "
            "until the migration commits")


def _vacuum(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    opts = {str(o.defname).lower() for o in node.options or ()}
    p.tables = [a.rel(r.relation) for r in node.rels or ()]
    if not node.is_vacuumcmd:
        p.lock = SUE   # ANALYZE: statistics only
        return
    p.no_transaction = "VACUUM"
    if "full" in opts:
        if p.tables and all(t in a.created for t in p.tables):
            return
        old = [t for t in p.tables if t not in a.created] or ["every table"]
        p.lock, p.rewrites, p.slow = AE, True, f"VACUUM FULL rewrites {', '.join(old)}"
        a.f(p, "table-rewrite", st, f"VACUUM FULL rewrites {', '.join(old)} under ACCESS EXCLUSIVE: reads and "
            "writes wait for the whole copy")
    else:
        p.lock = SUE


def _cluster(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    if node.relation is None:
        p.no_transaction = "CLUSTER without a table"
        p.lock, p.rewrites = AE, True
        a.f(p, "table-rewrite", st, "CLUSTER rewrites every clustered table under ACCESS EXCLUSIVE")
        return
    table = a.rel(node.relation)
    p.tables = [table]
    if table in a.created:
        return
    p.lock, p.rewrites, p.slow = AE, True, f"CLUSTER rewrites {table}"
    a.f(p, "table-rewrite", st, f"CLUSTER rewrites {table} in index order under ACCESS EXCLUSIVE: reads and "
        "writes wait for the whole copy")


def _refresh(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    view = a.rel(node.relation)
    p.tables = [view]
    if view in a.created:
        return
    if node.concurrent:
        p.lock, p.slow = "EXCLUSIVE", None
        return
    p.lock, p.rewrites, p.slow = AE, True, f"REFRESH MATERIALIZED VIEW {view}"
    a.f(p, "refresh-matview-not-concurrent", st, f"REFRESH MATERIALIZED VIEW {view} blocks reads of it under "
        "ACCESS EXCLUSIVE until the query finishes")


def _create_table_as(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    table = a.rel(node.into.rel)
    p.tables, p.lock = [table], "none"
    if a.create(table, bool(node.if_not_exists)):
        a.wrote(table)
    else:
        p.lock = "ACCESS SHARE"


def _select(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    if node.intoClause is not None:   # SELECT ... INTO new_table
        table = a.rel(node.intoClause.rel)
        p.tables = [table]
        a.create(table, False)
        a.wrote(table)
        return
    p.lock = "ACCESS SHARE"


def _copy(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    table = a.rel(node.relation)
    p.tables = [table] if table else []
    p.lock = "ROW EXCLUSIVE" if node.is_from else "ACCESS SHARE"
    if node.is_from:
        a.wrote(table)


def _alter_enum(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    from changeover.migrations.lint import name_of
    if node.oldVal:
        a.f(p, "renaming-object", st, f"renaming value {node.oldVal!r} of enum "
            f"{'.'.join(name_of(n) for n in node.typeName)} breaks running code that still writes it")


def _set_schema(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    what = str(node.objectType.name).removeprefix("OBJECT_").lower()
    table = a.rel(node.relation)
    p.tables, p.lock = ([table] if table else []), AE
    if table and table in a.created:
        p.lock = "none"
        return
    rule = "renaming-table" if what == "table" else "renaming-object"
    a.f(p, rule, st, f"moving {what} {table or '.'.join(_names(node.object))} to schema {node.newschema} "
        "breaks the running code that names it by its old schema")


def _do(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    opts = {str(d.defname): getattr(d.arg, "sval", None) for d in node.args or ()}
    body = plpgsql.read(str(opts.get("as") or ""), str(opts.get("language") or "plpgsql"))
    for why in body.unjudged:
        a.unjudged(st, p, f"DO block: {why}")
    a.nested += 1
    try:
        for sql in body.statements:
            try:
                parsed = pglast.parse_sql(sql)
            except ParseError as e:
                a.unjudged(st, p, f"DO block: {sql[:60]!r} does not parse ({e})")
                continue
            for raw in parsed:
                inner = Statement(sql, st.offset, st.line, st.col, raw.stmt, -1)
                sub = StatementPlan(p.index, st.line, st.col, sql, "", "none", False, "expand", [], [])
                a.judge(inner, sub)
                p.lock = strongest_lock(p.lock, sub.lock)
                p.rewrites = p.rewrites or sub.rewrites
                p.tables += [t for t in sub.tables if t not in p.tables]
                p.findings += sub.findings
                p.slow = p.slow or sub.slow
                p.no_transaction = p.no_transaction or sub.no_transaction
    finally:
        a.nested -= 1


def _createdb(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    p.no_transaction = "CREATE DATABASE"


def _dropdb(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    p.no_transaction = "DROP DATABASE"
    a.f(p, "dropping-object", st, f"drops database {node.dbname}")


def _alter_system(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    p.no_transaction = "ALTER SYSTEM"


def _drop_owned(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    p.lock = AE
    a.f(p, "dropping-object", st, "DROP OWNED drops every object the roles own")


def _drop_role(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    a.f(p, "dropping-object", st, "drops a role (the running code may connect as it)")


HANDLERS: dict[str, Callable[[Analyzer, Any, Statement, StatementPlan], None]] = {
    "IndexStmt": _index, "DropStmt": _drop, "ReindexStmt": _reindex, "TruncateStmt": _truncate,
    "LockStmt": _lock, "VacuumStmt": _vacuum, "ClusterStmt": _cluster, "RefreshMatViewStmt": _refresh,
    "CreateTableAsStmt": _create_table_as, "SelectStmt": _select, "CopyStmt": _copy,
    "AlterEnumStmt": _alter_enum, "AlterObjectSchemaStmt": _set_schema, "DoStmt": _do,
    "CreatedbStmt": _createdb, "DropdbStmt": _dropdb, "AlterSystemStmt": _alter_system,
    "DropOwnedStmt": _drop_owned, "DropRoleStmt": _drop_role,
}
__all__ = ["HANDLERS", "HARMLESS"]
