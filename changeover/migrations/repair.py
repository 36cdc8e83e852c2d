"""Deliberate edits of the history: accepting changed files, resolving a dirty migration, and
adopting an existing database (baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from changeover.errors import MigrationError, UsageError
from changeover.migrations import engine, formats, history
from changeover.migrations.formats import norm, version_key
from changeover.migrations.judge import analyse_run
from changeover.migrations.lock import runner_lock
from changeover.migrations.source import database_for, discover

if TYPE_CHECKING:
    from changeover.config import Config

DIRTY_CHOICES = ("applied", "pending")


def repair(config: Config, *, dirty: str | None = None, release_dir: str | Path | None = None,
           database_url: str | None = None) -> list[str]:
    """Accept changed files deliberately (record their current checksums), and resolve a dirty
    migration: dirty="applied" (its changes are all in place) or "pending" (none are). -> what was fixed."""
    if dirty is not None and dirty not in DIRTY_CHOICES:
        raise UsageError(f"--dirty expects applied or pending, got {dirty!r}")
    cfg = config.migrations
    db = database_for(config, database_url)
    _, ms = discover(config, release_dir)
    fixed = []
    with runner_lock(db):
        conn = db.connect("repair")
        try:
            history.ensure(conn, cfg.table)
            applied = history.load(conn, cfg.table)
            stuck = [h for h in applied.values() if h.state == history.DIRTY]
            if stuck and dirty is None:
                raise UsageError("; ".join(f"{h.id} is dirty ({h.failed})" for h in stuck) + " — look at the "
                                 "database, then choose: `changeover migrate repair --dirty applied` (its changes "
                                 "are all in place) or `--dirty pending` (none are: the next run applies it again)")
            if dirty is not None and not stuck:
                raise UsageError("no migration is dirty: nothing for --dirty to resolve")
            by_key = {m.key: m for m in ms}
            for h in stuck:
                conn.begin()
                if dirty == "applied":
                    history.set_state(conn, cfg.table, h.version, history.APPLIED, None)
                    fixed_file = by_key.get(norm(h.version))
                    if fixed_file is not None:  # the file may have been corrected since it failed
                        history.set_checksum(conn, cfg.table, h.version, fixed_file.checksum)
                else:
                    history.revert(conn, cfg.table, h.version)
                conn.commit()
                fixed.append(f"{h.id} (dirty, now {dirty})")
            for m in ms:
                row = applied.get(m.key)
                if row is not None and row.state != history.DIRTY and row.checksum != m.checksum:
                    history.set_checksum(conn, cfg.table, row.version, m.checksum)
                    fixed.append(m.id)
        finally:
            conn.close()
    return fixed


def baseline(config: Config, version: str, *, release: str | None = None, release_dir: str | Path | None = None,
             database_url: str | None = None) -> list[str]:
    """Adopt an existing database: record every migration up to VERSION as applied without running
    it (Flyway's baseline). Only on a database with no changeover history. -> the ids recorded."""
    if not formats.VERSION.match(version):
        raise UsageError(f"baseline expects a version number, got {version!r}")
    cfg = config.migrations
    db = database_for(config, database_url)
    src, ms = discover(config, release_dir)
    upto = [m for m in ms if version_key(m.version) <= version_key(version)]
    if not upto:
        raise UsageError(f"no migration in {src.dir} ({src.origin}) is at or before version {version}")
    analyses = analyse_run(ms, db.dialect)
    with runner_lock(db):
        conn = db.connect("baseline")
        try:
            history.ensure(conn, cfg.table)
            applied = history.load(conn, cfg.table)
            if applied:
                newest = max(applied.values(), key=lambda h: version_key(h.version))
                raise MigrationError(f"{cfg.table} already records {len(applied)} applied migration(s) (newest "
                                     f"{newest.id}): baseline only adopts a database without changeover history "
                                     "— use `changeover migrate up`")
            conn.begin()
            try:
                for m in upto:
                    history.insert(conn, cfg.table, m.version, m.name, analyses[m.version].phase, m.checksum, 0,
                                   release)
                conn.commit()
            except engine.DB_ERRORS as e:
                conn.rollback()
                raise MigrationError(f"baseline failed, nothing was recorded: {e}") from None
        finally:
            conn.close()
    return [m.id for m in upto]
