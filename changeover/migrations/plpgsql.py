"""The SQL inside a `DO` block, read with PostgreSQL's own PL/pgSQL parser (pglast).

A DO block is judged by the statements it can run: every embedded SQL statement (in any branch
of IF/CASE/loops, since which branch runs depends on the database), and EXECUTE of a string
literal. What cannot be known before it runs — EXECUTE of a computed string, CALL, another
language — is reported, and the block is then unjudged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pglast
from pglast.parser import ParseError, parse_plpgsql_json

# PL/pgSQL statements that only compute, assign, read or report: nothing to judge
_HARMLESS = frozenset({
    "PLpgSQL_stmt_block", "PLpgSQL_stmt_assign", "PLpgSQL_stmt_if", "PLpgSQL_stmt_case", "PLpgSQL_stmt_loop",
    "PLpgSQL_stmt_while", "PLpgSQL_stmt_fori", "PLpgSQL_stmt_fors", "PLpgSQL_stmt_foreach_a",
    "PLpgSQL_stmt_exit", "PLpgSQL_stmt_return", "PLpgSQL_stmt_raise", "PLpgSQL_stmt_assert",
    "PLpgSQL_stmt_getdiag", "PLpgSQL_stmt_perform", "PLpgSQL_stmt_execsql", "PLpgSQL_stmt_dynexecute",
    "PLpgSQL_stmt_open", "PLpgSQL_stmt_fetch", "PLpgSQL_stmt_close", "PLpgSQL_stmt_forc",
    "PLpgSQL_stmt_dynfors", "PLpgSQL_stmt_return_next", "PLpgSQL_stmt_return_query",
})


@dataclass
class Body:
    statements: list[str] = field(default_factory=list)   # SQL the block may run, in source order
    unjudged: list[str] = field(default_factory=list)     # why parts of it cannot be judged


def _nodes(tree: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k.startswith("PLpgSQL_stmt_"):
                yield k, v
            yield from _nodes(v)
    elif isinstance(tree, list):
        for x in tree:
            yield from _nodes(x)


def _query(expr: Any) -> str:
    return str(expr.get("PLpgSQL_expr", {}).get("query", "")) if isinstance(expr, dict) else ""


def _literal(expr: str) -> str | None:
    """The value of a SQL string literal expression ('DROP TABLE x'), or None if it is computed."""
    try:
        stmts = pglast.parse_sql(f"SELECT {expr}")
    except ParseError:
        return None
    sel: Any = stmts[0].stmt if stmts else None
    target = sel.targetList[0].val if sel is not None and sel.targetList else None
    sval = getattr(getattr(target, "val", None), "sval", None)
    return str(sval) if type(target).__name__ == "A_Const" and sval is not None else None


def read(body: str, language: str = "plpgsql") -> Body:
    out = Body()
    if language.lower() != "plpgsql":
        out.unjudged.append(f"a DO block in {language}")
        return out
    tag = "co_body"
    while f"${tag}$" in body:
        tag += "_"
    try:
        tree = json.loads(parse_plpgsql_json(
            f"CREATE FUNCTION co_do() RETURNS void LANGUAGE plpgsql AS ${tag}${body}${tag}$"))
    except (ParseError, ValueError) as e:
        out.unjudged.append(f"its PL/pgSQL does not parse ({e})")
        return out
    for kind, node in _nodes(tree):
        if kind == "PLpgSQL_stmt_execsql":
            out.statements.append(_query(node.get("sqlstmt")))
        elif kind in ("PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors"):
            text = _literal(_query(node.get("query")))
            if text is None:
                out.unjudged.append(f"EXECUTE of a computed string ({_query(node.get('query'))[:60]})")
            else:
                out.statements.append(text)
        elif kind == "PLpgSQL_stmt_call":
            out.unjudged.append(f"CALL/DO inside the block ({_query(node.get('expr'))[:60]})")
        elif kind not in _HARMLESS:
            out.unjudged.append(f"PL/pgSQL {kind.removeprefix('PLpgSQL_stmt_')}")
    return out
