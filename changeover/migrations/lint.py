"""Static analysis of migration scripts on pglast's parse tree: lock, rewrite, phase, findings.

Context matters, and is kept across a run over the migrations in order: a table created earlier
in the same migration is new (nobody else sees it, nothing is flagged on it); column types and
NOT VALID checks from earlier migrations tell whether a type change is binary coercible and
whether SET NOT NULL can skip its scan.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from changeover.migrations import sqltext
from changeover.migrations.analysis import Finding, LintContext, ScriptAnalysis, StatementPlan
from changeover.migrations.formats import Script
from changeover.migrations.rules import RULES, strongest_lock, worst_phase
from changeover.migrations.sqltext import SQLITE, SplitError, Statement

__all__ = ["Finding", "LintContext", "ScriptAnalysis", "StatementPlan", "analyze", "walk"]

# functions that return a new value per row: as a column default they force a table rewrite
VOLATILE = frozenset({"gen_random_uuid", "uuid_generate_v1", "uuid_generate_v1mc", "uuid_generate_v4",
                      "random", "clock_timestamp", "timeofday", "nextval", "txid_current", "setseed"})
# stable or immutable: evaluated once at ALTER time, stored as the "missing value" (no rewrite)
STABLE = frozenset({"now", "transaction_timestamp", "statement_timestamp", "current_setting", "lower",
                    "upper", "length", "concat", "coalesce", "to_timestamp", "to_char", "to_date",
                    "date_trunc", "make_interval", "jsonb_build_object", "json_build_object", "array"})
SERIALS = frozenset({"serial", "serial4", "bigserial", "serial8", "smallserial", "serial2"})
SMALL_INTS = frozenset({"int2", "int4", "serial", "serial4", "smallserial", "serial2", "integer", "int"})


def walk(node: Any) -> Iterator[Any]:
    """Every pglast node under `node`, itself included."""
    if isinstance(node, tuple | list):
        for x in node:
            yield from walk(x)
        return
    if node is None or not hasattr(type(node), "__slots__") or isinstance(node, str | int | float):
        return
    yield node
    for name in type(node).__slots__:
        v = getattr(node, name, None)
        if v is not None and not isinstance(v, str | int | float | bool):
            yield from walk(v)


def _name(n: Any) -> str:
    return str(getattr(n, "sval", n))


def _type(tn: Any) -> tuple[str, int]:
    """TypeName -> (last name, first typmod or -1)."""
    name = _name(tn.names[-1]).lower()
    mod = -1
    if tn.typmods:
        val = getattr(tn.typmods[0], "val", None)
        mod = int(getattr(val, "ival", -1))
    return name, mod


def _kind(node: Any) -> str:
    k = type(node).__name__
    return k[:-4] if k.endswith("Stmt") else k


def _rel(rv: Any) -> str:
    return str(rv.relname).lower() if rv is not None else ""


def _contype(c: Any) -> str:
    return str(c.contype.name).removeprefix("CONSTR_")


class _Analyzer:
    def __init__(self, script: Script, ctx: LintContext) -> None:
        self.script, self.ctx = script, ctx
        self.path = str(script.path)
        self.created: set[str] = set()      # tables created earlier in this migration
        self.backfill_tables = {b.table.split(".")[-1] for b in script.directives.backfills}
        self.file_ignores: dict[str, str] = {}
        self.statement_ignores: dict[int, dict[str, str]] = {}
        self.in_tx_block = False

    def place_ignores(self, statements: list[Statement]) -> None:
        """An ignore above the first statement covers the file; one further down, the next statement."""
        first = statements[0].line if statements else None
        self.file_ignores = {}
        for line, rule, reason in self.script.directives.ignores:
            if first is None or line < first:
                self.file_ignores[rule] = reason
                continue
            target = next((i for i, st in enumerate(statements, 1) if st.line > line), None)
            if target is not None:
                self.statement_ignores.setdefault(target, {})[rule] = reason

    def ignored(self, rule_id: str, index: int = 0) -> str | None:
        return self.statement_ignores.get(index, {}).get(rule_id) or self.file_ignores.get(rule_id)

    # -- findings --------------------------------------------------------------------------------
    def finding(self, rule_id: str, st: Statement, index: int, message: str, node: Any = None) -> Finding:
        rule = RULES[rule_id]
        line, col = st.line, st.col
        loc = getattr(node, "location", None) if node is not None else None
        if isinstance(loc, int) and loc >= 0:
            line, col = sqltext.position(self.script.text, st.node_base + loc, self.script.line_offset)
        return Finding(rule.id, rule.severity, rule.phase, self.path, line, col, message, rule.recipe, index,
                       self.ignored(rule.id, index))

    # -- statements ------------------------------------------------------------------------------
    def statement(self, st: Statement, index: int) -> StatementPlan:
        node = st.node
        p = StatementPlan(index, st.line, st.col, st.text, _kind(node) if node is not None else "statement",
                          "none", False, "expand", [], [], node=node)
        if node is None:
            self._opaque(st, p)
        else:
            handler = getattr(self, "_" + type(node).__name__, None)
            if handler is not None:
                handler(node, st, p)
        if self.ctx.dialect == SQLITE:
            p.findings = [f for f in p.findings if SQLITE in RULES[f.rule].dialects]
            if p.lock != "none" or p.kind in ("Update", "Delete", "Insert"):
                p.lock = "database write lock"
            p.rewrites = False
        active = [f for f in p.findings if not f.ignored]
        p.phase = worst_phase("expand", *(f.phase for f in active))
        return p

    def _opaque(self, st: Statement, p: StatementPlan) -> None:
        # SQLite syntax pglast cannot read: classify by its leading words
        words = st.text.upper().split()
        head = " ".join(words[:2])
        if head.startswith("DROP TABLE"):
            p.kind, p.lock = "Drop", "database write lock"
            p.findings.append(self.finding("dropping-table", st, p.index, "drops a table"))
        elif head.startswith(("CREATE", "INSERT")):
            p.lock = "database write lock"

    def _f(self, p: StatementPlan, rule: str, st: Statement, msg: str, node: Any = None) -> None:
        p.findings.append(self.finding(rule, st, p.index, msg, node))

    def _TransactionStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        kind = str(node.kind.name)
        self.in_tx_block = kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START")

    def _CreateStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        table = _rel(node.relation)
        self.created.add(table)
        p.tables, p.lock = [table], "none"
        pk_cols: set[str] = set()
        for el in node.tableElts or ():
            if type(el).__name__ == "Constraint" and _contype(el) == "PRIMARY":
                pk_cols |= {_name(k).lower() for k in el.keys or ()}
        for el in node.tableElts or ():
            if type(el).__name__ == "ColumnDef":
                is_pk = el.colname.lower() in pk_cols or any(
                    _contype(c) == "PRIMARY" for c in el.constraints or ())
                self._column_hygiene(table, el, st, p, key=is_pk)

    def _column_hygiene(self, table: str, col: Any, st: Statement, p: StatementPlan, key: bool) -> None:
        if col.typeName is None:
            return
        tname, mod = _type(col.typeName)
        self.ctx.columns[(table, col.colname.lower())] = (tname, mod)
        cname = col.colname.lower()
        if tname in SMALL_INTS and (key or cname == "id" or cname.endswith("_id")):
            self._f(p, "prefer-bigint", st, f"{table}.{col.colname} is a {tname} key", col)
        if tname in ("serial", "serial4", "bigserial", "serial8", "smallserial", "serial2"):
            self._f(p, "prefer-identity", st, f"{table}.{col.colname} uses {tname}", col)
        if tname == "timestamp":
            self._f(p, "prefer-timestamptz", st, f"{table}.{col.colname} is timestamp without time zone", col)
        if tname == "varchar" and mod >= 0:
            self._f(p, "prefer-text", st, f"{table}.{col.colname} is varchar({mod})", col)

    def _AlterTableStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        table = _rel(node.relation)
        p.tables = [table]
        new = table in self.created
        locks = []
        for cmd in node.cmds or ():
            sub = str(cmd.subtype.name).removeprefix("AT_")
            lock = "ACCESS EXCLUSIVE"
            if sub == "AddColumn":
                self._add_column(table, cmd.def_, st, p, new)
            elif sub == "DropColumn":
                if not new:
                    self._f(p, "dropping-column", st, f"drops column {table}.{cmd.name}")
            elif sub == "SetNotNull":
                chk = [v for v in self.ctx.nn_checks.values() if v[:2] == (table, cmd.name.lower()) and v[2]]
                if not new and not chk:
                    p.rewrites = p.rewrites  # a scan, not a rewrite
                    self._f(p, "setting-not-null", st, f"SET NOT NULL on {table}.{cmd.name} scans the whole "
                            "table under ACCESS EXCLUSIVE (no validated CHECK (col IS NOT NULL) found)")
            elif sub == "AlterColumnType":
                self._alter_type(table, cmd, st, p, new)
            elif sub == "AddConstraint":
                lock = self._add_constraint(table, cmd.def_, st, p, new)
            elif sub == "ValidateConstraint":
                lock = "SHARE UPDATE EXCLUSIVE"
                if cmd.name in self.ctx.nn_checks:
                    t, c, _ = self.ctx.nn_checks[cmd.name]
                    self.ctx.nn_checks[cmd.name] = (t, c, True)
            locks.append(lock)
        p.lock = "none" if new else strongest_lock(*locks)

    def _add_column(self, table: str, col: Any, st: Statement, p: StatementPlan, new: bool) -> None:
        self._column_hygiene(table, col, st, p, key=False)
        if new:
            return
        tname, _ = _type(col.typeName)
        cons = {_contype(c): c for c in col.constraints or ()}
        default = cons.get("DEFAULT")
        if tname in SERIALS or "IDENTITY" in cons:
            p.rewrites = True
            self._f(p, "adding-serial-column", st,
                    f"adding {table}.{col.colname} as {tname if tname in SERIALS else 'identity'} rewrites "
                    "the table under ACCESS EXCLUSIVE", col)
        if "GENERATED" in cons:
            p.rewrites = True
            self._f(p, "adding-stored-generated-column", st,
                    f"stored generated column {table}.{col.colname} rewrites the table under ACCESS EXCLUSIVE",
                    col)
        if default is not None:
            fn = self._volatile(default.raw_expr)
            if fn:
                p.rewrites = True
                self._f(p, "adding-volatile-default", st, f"default {fn}() on {table}.{col.colname} is "
                        "evaluated per row: the table is rewritten under ACCESS EXCLUSIVE", col)
        if ("NOTNULL" in cons or "PRIMARY" in cons) and default is None and "IDENTITY" not in cons \
                and tname not in SERIALS:
            self._f(p, "adding-required-column", st, f"{table}.{col.colname} is NOT NULL without a default: "
                    "fails on a non-empty table and breaks the running code's INSERTs", col)

    @staticmethod
    def _volatile(expr: Any) -> str | None:
        for n in walk(expr):
            if type(n).__name__ == "FuncCall":
                name = _name(n.funcname[-1]).lower()
                if name in VOLATILE or name not in STABLE:
                    return name
        return None

    def _alter_type(self, table: str, cmd: Any, st: Statement, p: StatementPlan, new: bool) -> None:
        col = cmd.name.lower()
        tname, mod = _type(cmd.def_.typeName)
        old = self.ctx.columns.get((table, col))
        self.ctx.columns[(table, col)] = (tname, mod)
        if new:
            return
        if old is not None and _binary_coercible(old, (tname, mod)) and cmd.def_.raw_default is None:
            return
        p.rewrites = True
        was = f" from {old[0]}" if old else ""
        self._f(p, "changing-column-type", st, f"changing {table}.{cmd.name}{was} to {tname} rewrites the "
                "table under ACCESS EXCLUSIVE and breaks code that expects the old type", cmd.def_)

    def _add_constraint(self, table: str, con: Any, st: Statement, p: StatementPlan, new: bool) -> str:
        kind = _contype(con)
        if kind == "CHECK" and type(con.raw_expr).__name__ == "NullTest" and con.conname:
            arg = con.raw_expr.arg
            if type(arg).__name__ == "ColumnRef" and str(con.raw_expr.nulltesttype.name).endswith("IS_NOT_NULL"):
                self.ctx.nn_checks[con.conname] = (table, _name(arg.fields[-1]).lower(), not con.skip_validation)
        if new:
            return "ACCESS EXCLUSIVE"
        if kind == "FOREIGN":
            if not con.skip_validation:
                self._f(p, "constraint-missing-not-valid", st, f"FOREIGN KEY on {table} without NOT VALID "
                        "scans the table while holding SHARE ROW EXCLUSIVE on both tables (writes blocked)")
            p.tables.append(_rel(con.pktable))
            return "SHARE ROW EXCLUSIVE"
        if kind == "CHECK" and not con.skip_validation:
            self._f(p, "constraint-missing-not-valid", st,
                    f"CHECK on {table} without NOT VALID scans the table under ACCESS EXCLUSIVE")
        if kind in ("UNIQUE", "PRIMARY") and not con.indexname:
            self._f(p, "unique-without-index", st, f"{kind.replace('PRIMARY', 'PRIMARY KEY')} on {table} "
                    "builds its index under ACCESS EXCLUSIVE")
        if kind == "EXCLUSION":
            self._f(p, "exclusion-constraint", st, f"EXCLUDE on {table} builds its index under ACCESS EXCLUSIVE")
        return "ACCESS EXCLUSIVE"

    def _IndexStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        table = _rel(node.relation)
        p.tables, p.concurrent = [table], bool(node.concurrent)
        if table in self.created:
            return
        p.lock = "SHARE UPDATE EXCLUSIVE" if node.concurrent else "SHARE"
        if node.concurrent:
            self._check_tx(st, p)
        else:
            self._f(p, "index-not-concurrent", st, f"CREATE INDEX on {table} blocks writes for the whole build")

    def _check_tx(self, st: Statement, p: StatementPlan) -> None:
        if self.in_tx_block or self.script.directives.transaction is True:
            self._f(p, "concurrently-in-transaction", st,
                    "CONCURRENTLY cannot run inside a transaction block")

    def _DropStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        what = str(node.removeType.name).removeprefix("OBJECT_").lower()
        names = [".".join(_name(x) for x in (o if isinstance(o, tuple | list) else (o,))).lower()
                 for o in node.objects or ()]
        p.tables = names if what == "table" else []
        p.concurrent = bool(node.concurrent)
        if what == "table":
            if all(n in self.created for n in names):
                return
            p.lock = "ACCESS EXCLUSIVE"
            self._f(p, "dropping-table", st, f"drops table {', '.join(names)}")
        elif what == "index":
            p.lock = "SHARE UPDATE EXCLUSIVE" if node.concurrent else "ACCESS EXCLUSIVE"
            if node.concurrent:
                self._check_tx(st, p)
            else:
                self._f(p, "drop-index-not-concurrent", st,
                        f"DROP INDEX {', '.join(names)} takes ACCESS EXCLUSIVE on its table")
        else:
            p.lock = "ACCESS EXCLUSIVE"
            self._f(p, "dropping-object", st, f"drops {what} {', '.join(names)}")

    def _ReindexStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        conc = any(getattr(o, "defname", "") == "concurrently" for o in node.params or ())
        p.concurrent = conc
        p.lock = "SHARE UPDATE EXCLUSIVE" if conc else "SHARE"
        if conc:
            self._check_tx(st, p)
        else:
            self._f(p, "reindex-not-concurrent", st, "REINDEX blocks writes while it rebuilds")

    def _RenameStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        what = str(node.renameType.name).removeprefix("OBJECT_").lower()
        table = _rel(node.relation)
        p.tables, p.lock = [table] if table else [], "ACCESS EXCLUSIVE"
        if table in self.created:
            p.lock = "none"
            return
        if what == "column":
            self._f(p, "renaming-column", st, f"renaming {table}.{node.subname} to {node.newname} breaks the "
                    "running code at once")
        elif what == "table":
            self._f(p, "renaming-table", st, f"renaming table {table} to {node.newname} breaks the running "
                    "code at once")

    def _UpdateStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        self._dml(_rel(node.relation), st, p, "UPDATE")

    def _DeleteStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        self._dml(_rel(node.relation), st, p, "DELETE")

    def _InsertStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        p.tables, p.lock = [_rel(node.relation)], "ROW EXCLUSIVE"

    def _dml(self, table: str, st: Statement, p: StatementPlan, verb: str) -> None:
        p.tables, p.lock = [table], "ROW EXCLUSIVE"
        if table in self.created:
            return
        if verb == "UPDATE" and table in self.backfill_tables:
            p.backfill = True
            return
        self._f(p, "unbatched-backfill", st, f"{verb} of existing table {table} in one transaction holds row "
                "locks on every row it touches until the migration commits")

    def _CreateTrigStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        table = _rel(node.relation)
        p.tables, p.lock = [table], "none" if table in self.created else "SHARE ROW EXCLUSIVE"


def _binary_coercible(old: tuple[str, int], new: tuple[str, int]) -> bool:
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


def analyze(script: Script, ctx: LintContext | None = None) -> ScriptAnalysis:
    """Lock, rewrite, phase and findings of every statement of one script."""
    ctx = ctx or LintContext()
    path = str(script.path)
    try:
        statements = sqltext.split(script.text, ctx.dialect, script.line_offset)
    except SplitError as e:
        rule = RULES["parse-error"]
        f = Finding(rule.id, rule.severity, rule.phase, path, e.line, e.col, e.message, rule.recipe)
        return ScriptAnalysis(path, [], [f], "unsafe", True)
    a = _Analyzer(script, ctx)
    a.place_ignores(statements)
    plans = [a.statement(st, i) for i, st in enumerate(statements, 1)]
    ctx.statements += len(plans)
    findings = [f for p in plans for f in p.findings]
    inferred = worst_phase("expand", *(p.phase for p in plans))
    phase = inferred
    d = script.directives
    if d.phase == "contract" and inferred == "expand":
        phase = "contract"   # declared: e.g. a data change that only the new code tolerates
    elif d.phase == "expand" and inferred != "expand":
        rule = RULES["phase-mismatch"]
        findings.append(Finding(rule.id, rule.severity, rule.phase, path, script.line_offset + 1, 1,
                                f"marked `phase expand` but its statements are {inferred}", rule.recipe, 0,
                                a.ignored(rule.id)))
        phase = "unsafe" if not a.ignored(rule.id) else inferred
    for b in d.backfills:
        if not any(p.backfill and b.table.split(".")[-1] in p.tables for p in plans):
            rule = RULES["backfill-without-update"]
            findings.append(Finding(rule.id, rule.severity, rule.phase, path, b.line, 1,
                                    f"`changeover:backfill table={b.table}` but no UPDATE of {b.table} follows",
                                    rule.recipe, 0, a.ignored(rule.id)))
            phase = worst_phase(phase, rule.phase)
    concurrent = any(p.concurrent for p in plans)
    transaction = (not concurrent) if d.transaction is None else d.transaction
    if ctx.dialect == SQLITE:
        transaction = d.transaction is not False
    return ScriptAnalysis(path, plans, findings, phase, transaction)
