"""Static analysis of migration scripts on pglast's parse tree: lock, rewrite, phase, findings.

Context matters, and is kept across a run over the migrations in order: a table created earlier
in the same migration is new (nobody else sees it, nothing is flagged on it); column types and
NOT VALID checks from earlier migrations tell whether a type change is binary coercible and
whether SET NOT NULL can skip its scan. `CREATE TABLE IF NOT EXISTS` does not make a table new:
it may already exist, full. When a database was read (LintContext.sizes), a table it does not
have yet is new for the whole run, and lock findings on empty tables become notices.

Nothing is unjudged: a statement (or ALTER TABLE action) that no handler here or in
changeover.migrations.statements models is `unjudged`, an error until the user confirms it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from changeover.migrations import altertable, hygiene, sqltext, statements, txlocks
from changeover.migrations.analysis import Finding, LintContext, ScriptAnalysis, StatementPlan, TableSize
from changeover.migrations.formats import Script
from changeover.migrations.rules import COMPAT_RULES, LOCK_RULES, RULES, strongest_lock, worst_phase
from changeover.migrations.sqltext import SQLITE, SplitError, Statement

__all__ = ["Finding", "LintContext", "ScriptAnalysis", "StatementPlan", "analyze", "walk"]

# functions that return a new value per row: as a column default they force a table rewrite
VOLATILE = frozenset({"gen_random_uuid", "uuid_generate_v1", "uuid_generate_v1mc", "uuid_generate_v4",
                      "random", "clock_timestamp", "timeofday", "nextval", "txid_current", "setseed"})
# stable or immutable: evaluated once at ALTER time, stored as the "missing value" (no rewrite). Offline
# an unknown function counts as volatile; with a database, pg_proc.provolatile decides.
STABLE = frozenset({
    "now", "transaction_timestamp", "statement_timestamp", "current_setting", "lower", "upper", "length",
    "concat", "concat_ws", "coalesce", "nullif", "greatest", "least", "to_timestamp", "to_char", "to_date",
    "to_number", "date_trunc", "date_part", "make_interval", "make_date", "make_timestamp", "make_timestamptz",
    "jsonb_build_object", "json_build_object", "jsonb_build_array", "json_build_array", "array", "md5",
    "sha256", "sha512", "encode", "decode", "substr", "substring", "replace", "trim", "btrim", "ltrim",
    "rtrim", "lpad", "rpad", "left", "right", "abs", "round", "floor", "ceil", "trunc", "format",
    "to_json", "to_jsonb", "array_to_string", "string_to_array", "pg_catalog", "current_date",
    "localtimestamp", "current_user", "session_user", "current_schema", "inet", "timezone", "uuid_nil"})
SERIALS = hygiene.SERIALS


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


def name_of(n: Any) -> str:
    return str(getattr(n, "sval", n))


def kind_of(node: Any) -> str:
    k = type(node).__name__
    return k[:-4] if k.endswith("Stmt") else k


def contype(c: Any) -> str:
    return str(c.contype.name).removeprefix("CONSTR_")


class Analyzer:
    def __init__(self, script: Script, ctx: LintContext) -> None:
        self.script, self.ctx = script, ctx
        self.path = str(script.path)
        self.created: set[str] = set()      # tables created earlier in this migration
        self.backfill_tables = {b.table.split(".")[-1] for b in script.directives.backfills}
        self.file_ignores: dict[str, str] = {}
        self.statement_ignores: dict[int, dict[str, str]] = {}
        self.in_tx_block = False
        self.nested = 0                      # > 0 while judging the statements of a DO block
        self.qualified: dict[str, str] = {}  # table -> schema.table, as the script names it
        self.sizes: dict[str, TableSize] = {}

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
        if isinstance(loc, int) and loc >= 0 and st.node_base >= 0:  # node_base < 0: inside a DO body
            line, col = sqltext.position(self.script.text, st.node_base + loc, self.script.line_offset)
        return Finding(rule.id, rule.severity, rule.phase, self.path, line, col, message, rule.recipe, index,
                       self.ignored(rule.id, index))

    def f(self, p: StatementPlan, rule: str, st: Statement, msg: str, node: Any = None) -> None:
        p.findings.append(self.finding(rule, st, p.index, msg, node))

    def unjudged(self, st: Statement, p: StatementPlan, what: str) -> None:
        p.lock = strongest_lock(p.lock, "unknown")
        self.f(p, "unjudged", st, f"changeover cannot judge this statement ({what}); confirm with "
               "`-- changeover:ignore unjudged <reason>`")

    # -- tables ----------------------------------------------------------------------------------
    def rel(self, rv: Any) -> str:
        if rv is None:
            return ""
        table = str(rv.relname).lower()
        if rv.schemaname:
            self.qualified[table] = f"{rv.schemaname}.{table}".lower()
        return table

    def size(self, table: str) -> TableSize | None:
        if self.ctx.sizes is None or not table:
            return None
        s = self.ctx.sizes.table(self.qualified.get(table, table))
        self.sizes[table] = s
        return s

    def run_new(self, table: str) -> bool:
        """Created by this run, absent from the database read: no running release knows it."""
        return table in self.ctx.run_tables

    def quiet(self, table: str) -> str | None:
        """Why a lock on `table` costs nobody anything (it is empty), or None."""
        if table in self.ctx.run_tables:
            return "created earlier in this run and still empty" if self.ctx.run_tables[table] == 0 else None
        s = self.size(table)
        return "empty (read from the database)" if s is not None and s.exists and s.rows == 0 else None

    def wrote(self, table: str) -> None:
        """Rows were added to `table`: a table of this run is no longer known to be empty."""
        if table in self.ctx.run_tables:
            self.ctx.run_tables[table] = None

    def create(self, table: str, if_not_exists: bool) -> bool:
        """A CREATE TABLE (AS): -> whether the table is new (nobody else can see it yet)."""
        s = self.size(table)
        if s is not None and not s.exists and table not in self.ctx.run_tables:
            self.ctx.run_tables[table] = 0
        if if_not_exists and not (s is not None and not s.exists):
            return False  # it may exist already, full: judge what follows as on an existing table
        self.created.add(table)
        return True

    # -- statements ------------------------------------------------------------------------------
    def judge(self, st: Statement, p: StatementPlan) -> None:
        """Run the handler of one parsed statement (also the statements of a DO body)."""
        node = st.node
        hygiene.identifiers(self, st, p)
        name = type(node).__name__
        own: Callable[[Any, Statement, StatementPlan], None] | None = getattr(self, "_" + name, None)
        if own is not None:
            own(node, st, p)
        elif name in statements.HANDLERS:
            statements.HANDLERS[name](self, node, st, p)
        elif name in statements.HARMLESS:
            p.lock = statements.HARMLESS[name]
        else:
            self.unjudged(st, p, f"{kind_of(node)} is not modelled")

    def statement(self, st: Statement, index: int) -> StatementPlan:
        node = st.node
        p = StatementPlan(index, st.line, st.col, st.text, kind_of(node) if node is not None else "statement",
                          "none", False, "expand", [], [], node=node)
        if node is None:
            self._opaque(st, p)
        else:
            self.judge(st, p)
        self._downgrade(p)
        if self.ctx.dialect == SQLITE:
            p.findings = [f for f in p.findings if SQLITE in RULES[f.rule].dialects]
            if p.lock not in ("none", "unknown") or p.kind in ("Update", "Delete", "Insert"):
                p.lock = "database write lock"
            p.rewrites, p.slow = False, None
        set_phase(p)
        return p

    def _downgrade(self, p: StatementPlan) -> None:
        """On an empty table, or one this run creates, lock and rewrite findings are only notices."""
        if not p.tables or (self.ctx.sizes is None and not self.ctx.run_tables):
            return
        table = p.tables[0]
        empty, new = self.quiet(table), self.run_new(table)
        if empty:
            p.slow = None
        for i, f in enumerate(p.findings):
            why = empty if f.rule in LOCK_RULES else ("created earlier in this run" if new else None) \
                if f.rule in COMPAT_RULES else None
            if why and f.severity != "warning":
                p.findings[i] = replace(f, severity="notice", phase="expand",
                                        message=f"{f.message} — only a notice: {table} is {why}")

    def _opaque(self, st: Statement, p: StatementPlan) -> None:
        # SQLite syntax pglast cannot read: classify by its leading words
        words = st.text.upper().split()
        head = " ".join(words[:2])
        if head.startswith("DROP TABLE"):
            p.kind, p.lock = "Drop", "database write lock"
            p.findings.append(self.finding("dropping-table", st, p.index, "drops a table"))
        elif head.startswith(("CREATE", "INSERT")):
            p.lock = "database write lock"

    def _TransactionStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        kind = str(node.kind.name)
        self.in_tx_block = kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START")

    def _CreateStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        table = self.rel(node.relation)
        known = any(t == table for t, _ in self.ctx.columns)
        new = self.create(table, bool(node.if_not_exists))
        p.tables, p.lock = [table], "none" if new else "ACCESS SHARE"
        pk_cols: set[str] = set()
        keys = self.ctx.keys.setdefault(table, set()) if new or not known else set()
        for el in node.tableElts or ():
            if type(el).__name__ == "Constraint" and contype(el) in ("PRIMARY", "UNIQUE"):
                cols = {name_of(k).lower() for k in el.keys or ()}
                if contype(el) == "PRIMARY":
                    pk_cols |= cols
                if len(cols) == 1:
                    keys |= cols
        for el in node.tableElts or ():
            if type(el).__name__ == "ColumnDef":
                cons = {contype(c) for c in el.constraints or ()}
                is_pk = el.colname.lower() in pk_cols or "PRIMARY" in cons
                if cons & {"PRIMARY", "UNIQUE"}:
                    keys.add(el.colname.lower())
                if not new:  # IF NOT EXISTS: known, keep what we know; unknown, it may exist with other types
                    columns = dict(self.ctx.columns)
                    hygiene.column(self, table, el, st, p, key=is_pk)
                    self.ctx.columns = columns
                else:
                    hygiene.column(self, table, el, st, p, key=is_pk)

    def _AlterTableStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        altertable.alter_table(self, node, st, p)

    def _RenameStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        statements.rename(self, node, st, p)

    def _UpdateStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        statements.dml(self, self.rel(node.relation), node, st, p, "UPDATE")

    def _DeleteStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        statements.dml(self, self.rel(node.relation), node, st, p, "DELETE")

    def _InsertStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        table = self.rel(node.relation)
        p.tables, p.lock = [table], "ROW EXCLUSIVE"
        self.wrote(table)

    def _CreateTrigStmt(self, node: Any, st: Statement, p: StatementPlan) -> None:
        table = self.rel(node.relation)
        p.tables, p.lock = [table], "none" if table in self.created else "SHARE ROW EXCLUSIVE"

    def volatile(self, expr: Any) -> str | None:
        for n in walk(expr):
            if type(n).__name__ == "FuncCall":
                name = name_of(n.funcname[-1]).lower()
                if name in VOLATILE:
                    return name
                known = self.ctx.sizes.volatility(name) if self.ctx.sizes is not None else None
                if known == "v" or (known is None and name not in STABLE):
                    return name
        return None


def set_phase(p: StatementPlan) -> None:
    p.phase = worst_phase("expand", *(f.phase for f in p.findings if not f.ignored))


def analyze(script: Script, ctx: LintContext | None = None) -> ScriptAnalysis:
    """Lock, rewrite, phase and findings of every statement of one script."""
    ctx = ctx or LintContext()
    path = str(script.path)
    try:
        split = sqltext.split(script.text, ctx.dialect, script.line_offset)
    except SplitError as e:
        rule = RULES["parse-error"]
        f = Finding(rule.id, rule.severity, rule.phase, path, e.line, e.col, e.message, rule.recipe)
        return ScriptAnalysis(path, [], [f], "unsafe", True)
    a = Analyzer(script, ctx)
    a.place_ignores(split)
    plans = [a.statement(st, i) for i, st in enumerate(split, 1)]
    ctx.statements += len(plans)
    d = script.directives
    concurrent = any(p.concurrent for p in plans)
    transaction = (not concurrent) if d.transaction is None else d.transaction
    if ctx.dialect == SQLITE:
        transaction = d.transaction is not False
    else:
        for p in plans:
            if p.no_transaction and (transaction or a.in_tx_block):
                p.findings.append(a.finding("transaction-incompatible", split[p.index - 1], p.index,
                                            f"{p.no_transaction} cannot run inside a transaction block, "
                                            "and this migration runs in one"))
                set_phase(p)
    held = txlocks.analyse(a, plans, split, transaction and ctx.dialect != SQLITE)
    findings = [f for p in plans for f in p.findings]
    inferred = worst_phase("expand", *(p.phase for p in plans))
    phase = inferred
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
                                    f"`changeover:backfill table={b.table}` but no UPDATE or DELETE of "
                                    f"{b.table} follows", rule.recipe, 0, a.ignored(rule.id)))
            phase = worst_phase(phase, rule.phase)
    return ScriptAnalysis(path, plans, findings, phase, transaction, held, dict(a.sizes))
