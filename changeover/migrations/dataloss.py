"""What a down script would destroy: tables, columns and rows that hold values now.

Rollback checks every down script with this before it undoes anything, so a refusal never comes
halfway through a run.
"""

from __future__ import annotations

from typing import Any

from changeover.migrations.db import Conn
from changeover.migrations.lint import ScriptAnalysis


def _relname(rv: Any) -> str:
    return f"{rv.schemaname}.{rv.relname}" if getattr(rv, "schemaname", None) else str(rv.relname)


def data_loss(conn: Conn, a: ScriptAnalysis) -> list[str]:
    """What a down script would destroy: tables, columns and rows that hold values now."""
    out = []
    for st in a.statements:
        node = st.node
        kind = type(node).__name__
        if kind == "DropStmt" and str(node.removeType.name) == "OBJECT_TABLE":
            out += [f"table {t}" for t in st.tables if conn.has_data(t)]
        elif kind == "DropStmt" and str(node.removeType.name) == "OBJECT_SCHEMA":
            for obj in node.objects or ():
                schema = str(getattr(obj, "sval", obj))
                full = [t for t in conn.schema_tables(schema) if conn.has_data(t)]
                if full:
                    out.append(f"schema {schema} (tables with rows: {', '.join(full)})")
        elif kind == "TruncateStmt":
            out += [f"rows of {t} (TRUNCATE)" for t in map(_relname, node.relations or ()) if conn.has_data(t)]
        elif kind == "DeleteStmt" and node.whereClause is None:
            table = _relname(node.relation)
            if conn.has_data(table):
                out.append(f"rows of {table} (DELETE without WHERE)")
        elif kind == "AlterTableStmt":
            table = _relname(node.relation)
            for cmd in node.cmds or ():
                sub = str(cmd.subtype.name)
                if sub == "AT_DropColumn" and conn.has_data(table, cmd.name):
                    out.append(f"column {table}.{cmd.name}")
                elif sub == "AT_AlterColumnType" and conn.has_data(table, cmd.name):
                    out.append(f"values of {table}.{cmd.name} (converted to another type)")
        elif node is None:
            words = st.sql.replace(";", " ").split()
            head = [w.upper() for w in words[:3]]
            if head[:2] == ["DROP", "TABLE"]:
                name = words[-1].strip('"`[]')
                if conn.has_data(name):
                    out.append(f"table {name}")
            elif head[:2] == ["DELETE", "FROM"] and len(words) == 3:
                name = words[2].strip('"`[]')
                if conn.has_data(name):
                    out.append(f"rows of {name} (DELETE without WHERE)")
    return out
