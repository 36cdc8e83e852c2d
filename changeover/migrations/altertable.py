"""Judging ALTER TABLE: every action it can hold, each with the lock PostgreSQL takes for it.

Actions not listed here are unjudged. Locks are PostgreSQL 15's (AlterTableGetLockLevel), checked
against pg_locks in tests/migrations/test_judgement_pg.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from changeover.migrations import hygiene
from changeover.migrations.analysis import StatementPlan
from changeover.migrations.rules import strongest_lock
from changeover.migrations.sqltext import Statement

if TYPE_CHECKING:
    from changeover.migrations.lint import Analyzer

AE, SUE, SRE = "ACCESS EXCLUSIVE", "SHARE UPDATE EXCLUSIVE", "SHARE ROW EXCLUSIVE"

# actions that are backward compatible and quick: their lock only
PLAIN = {
    "DropNotNull": AE, "AlterConstraint": AE, "EnableRowSecurity": AE, "DisableRowSecurity": AE,
    "ForceRowSecurity": AE, "NoForceRowSecurity": AE, "ChangeOwner": AE, "SetStatistics": SUE,
    "SetStorage": AE, "SetCompression": AE, "SetOptions": SUE, "ResetOptions": SUE, "SetRelOptions": SUE,
    "ResetRelOptions": SUE, "ReplaceRelOptions": SUE, "EnableTrig": SRE, "DisableTrig": SRE,
    "EnableAlwaysTrig": SRE, "EnableReplicaTrig": SRE, "EnableTrigAll": SRE, "DisableTrigAll": SRE,
    "EnableTrigUser": SRE, "DisableTrigUser": SRE, "EnableRule": AE, "DisableRule": AE,
    "EnableAlwaysRule": AE, "EnableReplicaRule": AE, "ReplicaIdentity": AE, "AddIdentity": AE,
    "SetIdentity": AE, "ClusterOn": SUE, "DropCluster": SUE, "GenericOptions": AE,
    "AlterColumnGenericOptions": AE, "DropExpression": AE, "AddInherit": AE, "DropInherit": AE,
}
# actions that copy the whole table into a new file
REWRITES = {"SetLogged": "SET LOGGED", "SetUnLogged": "SET UNLOGGED", "SetTableSpace": "SET TABLESPACE",
            "SetAccessMethod": "SET ACCESS METHOD"}


def alter_table(a: Analyzer, node: Any, st: Statement, p: StatementPlan) -> None:
    table = a.rel(node.relation)
    p.tables = [table]
    new = table in a.created
    locks = []
    for cmd in node.cmds or ():
        sub = str(cmd.subtype.name).removeprefix("AT_")
        lock = AE
        if sub == "AddColumn":
            lock = add_column(a, table, cmd.def_, st, p, new, if_not_exists=bool(cmd.missing_ok))
        elif sub == "DropColumn":
            if not new:
                a.f(p, "dropping-column", st, f"drops column {table}.{cmd.name}")
        elif sub == "ColumnDefault":
            if cmd.def_ is None and not new:
                a.f(p, "dropping-default", st, f"drops the default of {table}.{cmd.name}: old code's INSERTs "
                    "that leave the column out store NULL (or fail if it is NOT NULL)")
        elif sub == "DropIdentity":
            if not new:
                a.f(p, "dropping-default", st, f"drops the identity of {table}.{cmd.name}: old code's INSERTs "
                    "without it fail")
        elif sub == "SetNotNull":
            a.ctx.not_null.add((table, cmd.name.lower()))
            chk = [v for v in a.ctx.nn_checks.values() if v[:2] == (table, cmd.name.lower()) and v[2]]
            if not new and not chk:
                p.slow = f"SET NOT NULL scans {table}"
                a.f(p, "setting-not-null", st, f"SET NOT NULL on {table}.{cmd.name} scans the whole "
                    "table under ACCESS EXCLUSIVE (no validated CHECK (col IS NOT NULL) found)")
        elif sub == "AlterColumnType":
            alter_type(a, table, cmd, st, p, new)
        elif sub == "AddConstraint":
            lock = add_constraint(a, table, cmd.def_, st, p, new)
        elif sub == "DropConstraint":
            check = a.ctx.nn_checks.get(cmd.name)
            if not new and not (check and check[:2] in a.ctx.not_null):  # superseded by NOT NULL: harmless
                a.f(p, "dropping-constraint", st, f"drops constraint {cmd.name} of {table}")
        elif sub == "ValidateConstraint":
            lock = SUE
            if not new:
                p.slow = f"VALIDATE CONSTRAINT {cmd.name} scans {table}"
            if cmd.name in a.ctx.nn_checks:
                t, c, _ = a.ctx.nn_checks[cmd.name]
                a.ctx.nn_checks[cmd.name] = (t, c, True)
        elif sub in REWRITES:
            if not new:
                p.rewrites, p.slow = True, f"{REWRITES[sub]} rewrites {table}"
                a.f(p, "table-rewrite", st, f"{REWRITES[sub]} rewrites {table} under ACCESS EXCLUSIVE: reads "
                    "and writes wait for the whole copy")
        elif sub in PLAIN:
            lock = PLAIN[sub]
        else:
            a.unjudged(st, p, f"ALTER TABLE ... {sub} is not modelled")
            lock = "unknown"
        locks.append(lock)
    p.lock = "none" if new else strongest_lock(p.lock, *locks)


def add_column(a: Analyzer, table: str, col: Any, st: Statement, p: StatementPlan, new: bool,
               if_not_exists: bool = False) -> str:
    key = (table, col.colname.lower())
    unknown = if_not_exists and not new and not any(t == table for t, _ in a.ctx.columns)
    hygiene.column(a, table, col, st, p, key=False)
    if unknown:  # a table the history does not know may have the column already, of another type
        a.ctx.columns.pop(key, None)
    if new:
        return AE
    tname, _ = hygiene.type_of(col.typeName)
    cons = {contype(c): c for c in col.constraints or ()}
    default = cons.get("DEFAULT")
    lock = AE
    if tname in hygiene.SERIALS or "IDENTITY" in cons:
        p.rewrites = True
        a.f(p, "adding-serial-column", st,
            f"adding {table}.{col.colname} as {tname if tname in hygiene.SERIALS else 'identity'} rewrites "
            "the table under ACCESS EXCLUSIVE", col)
    if "GENERATED" in cons:
        p.rewrites = True
        a.f(p, "adding-stored-generated-column", st,
            f"stored generated column {table}.{col.colname} rewrites the table under ACCESS EXCLUSIVE", col)
    if default is not None:
        fn = a.volatile(default.raw_expr)
        if fn:
            p.rewrites = True
            a.f(p, "adding-volatile-default", st, f"default {fn}() on {table}.{col.colname} is "
                "evaluated per row: the table is rewritten under ACCESS EXCLUSIVE", col)
    if ("NOTNULL" in cons or "PRIMARY" in cons) and default is None and "IDENTITY" not in cons \
            and tname not in hygiene.SERIALS:
        a.f(p, "adding-required-column", st, f"{table}.{col.colname} is NOT NULL without a default: "
            "fails on a non-empty table and breaks the running code's INSERTs", col)
    # inline constraints are judged like their ADD CONSTRAINT forms (they cannot be NOT VALID)
    for kind, c in cons.items():
        if kind in ("UNIQUE", "PRIMARY"):
            word = "PRIMARY KEY" if kind == "PRIMARY" else "UNIQUE"
            p.slow = f"{word} on {table}.{col.colname} builds an index"
            a.f(p, "unique-without-index", st, f"{word} in ADD COLUMN {table}.{col.colname} builds its index "
                "under ACCESS EXCLUSIVE", c)
        elif kind == "FOREIGN":
            parent = a.rel(c.pktable)
            p.tables.append(parent)
            p.slow = f"REFERENCES {parent} on {table}.{col.colname} checks every row"
            a.f(p, "constraint-missing-not-valid", st, f"REFERENCES {parent} in ADD COLUMN {table}.{col.colname} "
                f"checks every row of {table} and takes SHARE ROW EXCLUSIVE on {parent} (its writes wait): add "
                "the column plain, then ADD CONSTRAINT ... FOREIGN KEY ... NOT VALID", c)
        elif kind == "CHECK":
            p.slow = f"CHECK on {table}.{col.colname} scans {table}"
            a.f(p, "constraint-missing-not-valid", st, f"CHECK in ADD COLUMN {table}.{col.colname} scans the "
                "table under ACCESS EXCLUSIVE: add the column plain, then ADD CONSTRAINT ... CHECK ... NOT VALID",
                c)
    if p.rewrites:
        p.slow = f"ADD COLUMN {col.colname} rewrites {table}"
    return lock


def alter_type(a: Analyzer, table: str, cmd: Any, st: Statement, p: StatementPlan, new: bool) -> None:
    col = cmd.name.lower()
    tname, mod = hygiene.type_of(cmd.def_.typeName)
    hygiene.type_warnings(a, f"{table}.{cmd.name}", tname, mod, st, p, cmd.def_)
    old = a.ctx.columns.get((table, col))
    a.ctx.columns[(table, col)] = (tname, mod)
    if new:
        return
    if old is not None and binary_coercible(old, (tname, mod)) and cmd.def_.raw_default is None:
        return
    p.rewrites, p.slow = True, f"ALTER COLUMN {cmd.name} TYPE rewrites {table}"
    was = f" from {old[0]}" if old else ""
    a.f(p, "changing-column-type", st, f"changing {table}.{cmd.name}{was} to {tname} rewrites the "
        "table under ACCESS EXCLUSIVE and breaks code that expects the old type", cmd.def_)


def add_constraint(a: Analyzer, table: str, con: Any, st: Statement, p: StatementPlan, new: bool) -> str:
    from changeover.migrations.lint import name_of
    kind = contype(con)
    if kind == "CHECK" and type(con.raw_expr).__name__ == "NullTest" and con.conname:
        arg = con.raw_expr.arg
        if type(arg).__name__ == "ColumnRef" and str(con.raw_expr.nulltesttype.name).endswith("IS_NOT_NULL"):
            a.ctx.nn_checks[con.conname] = (table, name_of(arg.fields[-1]).lower(), not con.skip_validation)
    if kind in ("UNIQUE", "PRIMARY") and len(con.keys or ()) == 1:
        a.ctx.keys.setdefault(table, set()).add(name_of(con.keys[0]).lower())
    if new:
        return AE
    if kind == "FOREIGN":
        if not con.skip_validation:
            p.slow = f"FOREIGN KEY on {table} checks every row"
            a.f(p, "constraint-missing-not-valid", st, f"FOREIGN KEY on {table} without NOT VALID "
                "scans the table while holding SHARE ROW EXCLUSIVE on both tables (writes blocked)")
        p.tables.append(a.rel(con.pktable))
        return SRE
    if kind == "CHECK" and not con.skip_validation:
        p.slow = f"CHECK on {table} scans it"
        a.f(p, "constraint-missing-not-valid", st,
            f"CHECK on {table} without NOT VALID scans the table under ACCESS EXCLUSIVE")
    if kind in ("UNIQUE", "PRIMARY") and not con.indexname:
        p.slow = f"{kind.replace('PRIMARY', 'PRIMARY KEY')} on {table} builds an index"
        a.f(p, "unique-without-index", st, f"{kind.replace('PRIMARY', 'PRIMARY KEY')} on {table} "
            "builds its index under ACCESS EXCLUSIVE")
    if kind == "EXCLUSION":
        p.slow = f"EXCLUDE on {table} builds an index"
        a.f(p, "exclusion-constraint", st, f"EXCLUDE on {table} builds its index under ACCESS EXCLUSIVE")
    return AE


def contype(c: Any) -> str:
    return str(c.contype.name).removeprefix("CONSTR_")


def binary_coercible(old: tuple[str, int], new: tuple[str, int]) -> bool:
    (ot, om), (nt, nm) = old, new
    texty = ("varchar", "text", "bpchar")
    if ot in ("varchar", "text") and nt == "text":
        return True
    if ot == "varchar" and nt == "varchar":
        return nm < 0 or (om >= 0 and nm >= om)
    if ot == "numeric" and nt == "numeric":
        return nm < 0 or nm == om
    if ot == nt and ot not in texty:
        return nm == om or nm < 0
    return ot == "cidr" and nt == "inet"
