"""Hygiene warnings (squawk's users expect them): column types that cost a rewrite later, and names
PostgreSQL would truncate. They never change a migration's phase."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pglast.parser import ParseError, scan

from changeover.migrations.analysis import StatementPlan
from changeover.migrations.sqltext import Statement

if TYPE_CHECKING:
    from changeover.migrations.lint import Analyzer

SERIALS = frozenset({"serial", "serial4", "bigserial", "serial8", "smallserial", "serial2"})
SMALL_INTS = frozenset({"int2", "int4", "serial", "serial4", "smallserial", "serial2", "integer", "int"})
NAMEDATALEN = 63   # bytes; longer identifiers are truncated with only a NOTICE
_WORDS = re.compile(r'"(?:[^"]|"")*"|[\w$]+')


def type_of(tn: Any) -> tuple[str, int]:
    """TypeName -> (last name, first typmod or -1)."""
    name = str(getattr(tn.names[-1], "sval", tn.names[-1])).lower()
    mod = -1
    if tn.typmods:
        val = getattr(tn.typmods[0], "val", None)
        mod = int(getattr(val, "ival", -1))
    return name, mod


def column(a: Analyzer, table: str, col: Any, st: Statement, p: StatementPlan, key: bool) -> None:
    """Warnings about a column definition (CREATE TABLE, ADD COLUMN)."""
    if col.typeName is None:
        return
    tname, mod = type_of(col.typeName)
    a.ctx.columns[(table, col.colname.lower())] = (tname, mod)
    cname = col.colname.lower()
    if tname in SMALL_INTS and (key or cname == "id" or cname.endswith("_id")):
        a.f(p, "prefer-bigint", st, f"{table}.{col.colname} is a {tname} key", col)
    if tname in SERIALS:
        a.f(p, "prefer-identity", st, f"{table}.{col.colname} uses {tname}", col)
    type_warnings(a, f"{table}.{col.colname}", tname, mod, st, p, col)


def type_warnings(a: Analyzer, what: str, tname: str, mod: int, st: Statement, p: StatementPlan,
                  node: Any) -> None:
    """Warnings about a type, wherever it is chosen (also ALTER COLUMN ... TYPE)."""
    if tname == "timestamp":
        a.f(p, "prefer-timestamptz", st, f"{what} is timestamp without time zone", node)
    if tname == "varchar" and mod >= 0:
        a.f(p, "prefer-text", st, f"{what} is varchar({mod})", node)
    if tname == "bpchar":
        a.f(p, "prefer-text-over-char", st, f"{what} is char({max(mod, 1)})", node)


def identifiers(a: Analyzer, st: Statement, p: StatementPlan) -> None:
    """Names over 63 bytes, read from the text: the parser has already truncated them in the tree."""
    if not any(len(w.encode()) > NAMEDATALEN for w in _WORDS.findall(st.text)):
        return  # the usual case, without tokenizing the statement again
    seen: set[str] = set()
    try:
        tokens = scan(st.text)
    except ParseError:
        return
    for tok in tokens:
        if tok.name != "IDENT":
            continue
        raw = st.text[tok.start:tok.end + 1]
        name = raw[1:-1].replace('""', '"') if raw.startswith('"') else raw.lower()
        size = len(name.encode())
        if size > NAMEDATALEN and name not in seen:
            seen.add(name)
            kept = name.encode()[:NAMEDATALEN].decode(errors="ignore")
            a.f(p, "identifier-too-long", st, f"{name[:30]}... is {size} bytes: PostgreSQL keeps only the "
                f"first {NAMEDATALEN} ({kept})")
