"""Bad input never gives a traceback: any text lints to findings, with positions inside the file."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from changeover.migrations.formats import Script
from changeover.migrations.lint import LintContext, analyze

WORDS = ["ALTER", "TABLE", "t", "ADD", "COLUMN", "c", "int", "DEFAULT", "gen_random_uuid()", "NOT", "NULL",
         "CREATE", "INDEX", "CONCURRENTLY", "ON", "(", ")", ";", "DROP", "RENAME", "TO", "UPDATE", "SET", "=",
         "1", "WHERE", "IS", "'x;y'", "$$", "--", "\n", "/*", "*/", "BEGIN", "COMMIT", "CHECK", "é",
         "DO", "$$ BEGIN", "END $$", "EXECUTE", "TRUNCATE", "LOCK", "VACUUM", "FULL", "IF NOT EXISTS", "AS", "SELECT",
         "INTO", "REFERENCES", "UNIQUE", "LANGUAGE", "plpgsql"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.lists(st.sampled_from(WORDS), max_size=40).map(" ".join)),
       dialect=st.sampled_from(["postgresql", "sqlite"]))
def test_lint_never_raises(text: str, dialect: str) -> None:
    a = analyze(Script(Path("m.sql"), text), LintContext(dialect))
    lines = text.count("\n") + 1
    for f in a.findings:
        assert 1 <= f.line <= lines and f.col >= 1
    for s in a.statements:
        assert 1 <= s.line <= lines
