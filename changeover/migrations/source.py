"""Where migrations are read from, and which database they run on.

`[migrations] dir` is relative to the config file's directory. With `{release}` in it
(`dir = "{release}/migrations"`) migrations come with each release: they are read from the release
directory the caller gives (a deploy passes the one it deploys), or else from the live release's
directory in the daemon's state (the CLI). Errors and `migrate status` say which, and why.

The database is `[migrations] database` (default: DATABASE_URL of the environment changeover runs
in) unless the caller passes `database_url`: a deploy passes the release's own DATABASE_URL, so
that migrations and checks use the same database.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from changeover.errors import MigrationError
from changeover.migrations import formats, releases
from changeover.migrations.config import RELEASE_PLACEHOLDER
from changeover.migrations.db import Database, database
from changeover.migrations.formats import Migration

if TYPE_CHECKING:
    from changeover.config import Config


def database_for(config: Config, database_url: str | None = None) -> Database:
    return database(database_url or config.migrations.database, config.root)


@dataclass(frozen=True)
class Source:
    """The directory migrations are read from, and why that one."""

    dir: Path
    origin: str


def source(config: Config, release_dir: str | Path | None = None) -> Source:
    cfg = config.migrations
    origin = (f'[migrations] dir = "{cfg.dir}" in {config.file}' if cfg.dir_explicit
              else f'the default [migrations] dir "{cfg.dir}" beside {config.file}')
    raw = cfg.dir
    if cfg.per_release:
        if release_dir is None:
            rel = releases.live(config)
            if rel is None:
                raise MigrationError(f"{origin} reads migrations from a release directory, and none was given: "
                                     f"no release is live in {releases.state_path(config)}; pass --release-dir DIR")
            release_dir = rel.path
            origin += f", release {rel.version} (live in {rel.slot})"
        else:
            origin += f", release directory {release_dir}"
        raw = raw.replace(RELEASE_PLACEHOLDER, str(release_dir))
    d = Path(raw)
    return Source((d if d.is_absolute() else config.root / d).resolve(), origin)


def discover(config: Config, release_dir: str | Path | None = None) -> tuple[Source, list[Migration]]:
    src = source(config, release_dir)
    return src, formats.discover(src.dir, src.origin)


def enabled(config: Config, release_dir: str | Path | None = None, database_url: str | None = None) -> bool:
    """Does a deploy run migrations? It needs a database and a directory. A directory set in the
    config that does not exist is an error (a typo must not skip the migrations silently); the
    default `migrations/` may be absent."""
    if not (database_url or config.migrations.database):
        return False
    src = source(config, release_dir)
    if src.dir.is_dir():
        return True
    if config.migrations.dir_explicit:
        raise MigrationError(f"migrations directory {src.dir} ({src.origin}) does not exist")
    return False
