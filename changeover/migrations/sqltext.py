"""Splitting migration scripts into statements, with 1-based line:col positions.

PostgreSQL scripts are split by pglast (the real parser), so `$$` bodies, quoted semicolons and
comments are never cut wrongly. SQLite scripts are split with sqlite3.complete_statement, which
knows SQLite's own grammar (triggers with BEGIN ... END).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import pglast
from pglast.parser import ParseError

POSTGRES = "postgresql"
SQLITE = "sqlite"


@dataclass(frozen=True)
class Statement:
    text: str          # the statement without leading comments, without the trailing ';'
    offset: int        # character offset of `text` inside its script section
    line: int          # 1-based, in the file
    col: int           # 1-based
    node: Any = None   # the pglast node (None for SQLite statements pglast cannot read)
    node_base: int = 0  # add to a node's `location` to get an offset in the section


class SplitError(Exception):
    """A script that does not parse: message and 1-based position in the file."""

    def __init__(self, message: str, line: int, col: int) -> None:
        super().__init__(message)
        self.message, self.line, self.col = message, line, col


def position(text: str, offset: int, line_offset: int = 0) -> tuple[int, int]:
    """Character offset in a section -> 1-based (line, col) in the file."""
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line + line_offset, col


def skip_comments(text: str, i: int, end: int | None = None) -> int:
    """Index of the first character at or after i that is neither whitespace nor a comment."""
    end = len(text) if end is None else end
    while i < end:
        if text[i].isspace():
            i += 1
        elif text.startswith("--", i):
            nl = text.find("\n", i)
            i = end if nl < 0 else nl + 1
        elif text.startswith("/*", i):
            close = text.find("*/", i + 2)
            i = end if close < 0 else close + 2
        else:
            break
    return i


def _strip_end(text: str) -> str:
    text = text.rstrip()
    return text[:-1].rstrip() if text.endswith(";") else text


def split_postgres(text: str, line_offset: int = 0) -> list[Statement]:
    try:
        raw = pglast.parse_sql(text)
    except ParseError as e:
        msg, index = (*e.args, None)[:2]
        at = len(text.rstrip()) if index is None else min(int(index), len(text))  # None: at end of input
        line, col = position(text, at, line_offset)
        raise SplitError(str(msg), line, col) from None
    out = []
    for r in raw:
        loc = r.stmt_location or 0
        end = loc + r.stmt_len if r.stmt_len else len(text)
        start = skip_comments(text, loc, end)
        line, col = position(text, start, line_offset)
        out.append(Statement(_strip_end(text[start:end]), start, line, col, r.stmt))
    return out


def split_sqlite(text: str, line_offset: int = 0) -> list[Statement]:
    out: list[Statement] = []
    start = 0
    i = text.find(";")
    while i >= 0:
        if sqlite3.complete_statement(text[start:i + 1]):
            _add_sqlite(out, text, start, i + 1, line_offset)
            start = i + 1
        i = text.find(";", i + 1)
    _add_sqlite(out, text, start, len(text), line_offset)
    return out


def _add_sqlite(out: list[Statement], text: str, start: int, end: int, line_offset: int) -> None:
    s = skip_comments(text, start, end)
    body = _strip_end(text[s:end])
    if not body:
        return
    try:  # most SQLite DDL is also PostgreSQL syntax: reuse the real parser where it can read it
        nodes = pglast.parse_sql(body)
        node = nodes[0].stmt if len(nodes) == 1 else None
    except ParseError:
        node = None
    line, col = position(text, s, line_offset)
    out.append(Statement(body, s, line, col, node, s))


def split(text: str, dialect: str, line_offset: int = 0) -> list[Statement]:
    return split_sqlite(text, line_offset) if dialect == SQLITE else split_postgres(text, line_offset)
