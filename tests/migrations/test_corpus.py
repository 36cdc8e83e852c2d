"""The shop corpus (54 migrations: users, orders, renames the safe and the unsafe way) goes up,
all the way down, and up again on a real PostgreSQL; the linter finds exactly the unsafe ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest

from changeover.errors import LintFailed
from changeover.migrations import commands
from changeover.migrations.formats import discover

from .conftest import Project

CORPUS = Path(__file__).parent / "corpus" / "shop"
UNSAFE = {"0023", "0024", "0025", "0026", "0027", "0045", "0046"}
CONTRACT = {"0022", "0034", "0047", "0050", "0051"}


def test_corpus_is_big_enough() -> None:
    ms = discover(CORPUS)
    assert len(ms) >= 50 and all(m.down is not None for m in ms)


def test_lint_finds_exactly_the_unsafe_migrations() -> None:
    res = commands.lint(None, [str(CORPUS)])
    assert {Path(f.file).name[:4] for f in res.errors} == UNSAFE
    assert res.statements > 60


def test_corpus_up_down_up(project: Project, pg_url: str, tmp_path: Path) -> None:
    cfg = project(pg_url)
    shutil.rmtree(tmp_path / "migrations")
    shutil.copytree(CORPUS, tmp_path / "migrations")

    plan = commands.plan(cfg)
    phases = {p.migration.version: p.analysis.phase for p in plan.pending}
    assert {v for v, ph in phases.items() if ph == "unsafe"} == UNSAFE
    assert {v for v, ph in phases.items() if ph == "contract"} == CONTRACT

    first = commands.safe(cfg, "v1")
    assert first.stopped_at is not None and first.stopped_at.version == "0022"
    assert len(first.applied) == 21

    with pytest.raises(LintFailed, match="0023_products_rename_name_unsafe"):
        commands.up(cfg)
    assert commands.up(cfg, "v2", allow_unsafe=True).pending == 0
    assert not commands.status(cfg).pending

    with psycopg.connect(pg_url) as c:
        cols = {r[0] for r in c.execute("SELECT column_name FROM information_schema.columns "
                                        "WHERE table_name = 'users'")}
        assert "email" not in cols and "email_address" in cols
        assert c.execute("SELECT count(*) FROM users WHERE display_name IS NULL").fetchone() == (0,)
        assert c.execute("SELECT count(*) FROM products WHERE description IS NULL").fetchone() == (0,)

    down = commands.rollback(cfg, to="0", allow_data_loss=True)
    assert len(down.rolled_back) == 54
    with psycopg.connect(pg_url) as c:
        left = c.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
        assert left == [("changeover_migrations",)]

    again = commands.up(cfg, "v3", allow_unsafe=True)
    assert len(again.applied) == 54
    assert {m.release for m in commands.status(cfg).migrations} == {"v3"}


def test_sqlite_corpus_up_down_up(project: Project, tmp_path: Path) -> None:
    cfg = project("sqlite:///shop.db")
    shutil.rmtree(tmp_path / "migrations")
    shutil.copytree(CORPUS.parent / "shop_sqlite", tmp_path / "migrations")
    phases = {p.migration.version: p.analysis.phase for p in commands.plan(cfg).pending}
    assert phases["0009"] == "unsafe" and phases["0010"] == "contract"
    assert {v for v, ph in phases.items() if ph == "expand"} == {f"{i:04d}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 11)}
    res = commands.safe(cfg, "v1")
    assert len(res.applied) == 8 and res.stopped_at is not None and res.stopped_at.version == "0009"
    assert sum(s.backfilled_rows for s in res.applied) == 3500
    assert commands.up(cfg, "v2", allow_unsafe=True).pending == 0
    assert len(commands.rollback(cfg, to="0", allow_data_loss=True).rolled_back) == 11
    assert len(commands.up(cfg, "v3", allow_unsafe=True).applied) == 11
