"""[migrations] section of changeover.toml.

Defaults are named so docs, CLI help and tests quote the same numbers. lock_timeout follows
pgroll (500 ms): a DDL statement queued behind a long transaction blocks every later query on
the table, so it must give up quickly and retry rather than wait.

`dir` may name the release directory as `{release}` (e.g. "{release}/migrations"): migrations then
come with each release, and are read from the release being deployed (or, for the CLI, the live
one). A relative dir is relative to the config file's directory.
"""

from __future__ import annotations

from dataclasses import dataclass

from changeover.tables import Table

DEFAULT_DIR = "migrations"
RELEASE_PLACEHOLDER = "{release}"
DEFAULT_DATABASE_ENV = "DATABASE_URL"
DEFAULT_TABLE = "changeover_migrations"
DEFAULT_LOCK_TIMEOUT = 0.5          # seconds; pgroll's value
DEFAULT_STATEMENT_TIMEOUT = 3600.0  # seconds; strong_migrations recommends 1 h for migrations
DEFAULT_RETRIES = 5                 # extra attempts after a lock timeout
DEFAULT_BACKOFF = 1.0               # first pause after a lock timeout, doubled each attempt
DEFAULT_BACKOFF_MAX = 60.0          # cap of the pause (pgroll: 1 min)
DEFAULT_BATCH_SIZE = 1000           # backfill rows per transaction (pgroll: 1000)
DEFAULT_BATCH_PAUSE = 0.0           # pause between backfill batches
DEFAULT_LOCK_WAIT_POLL = 0.2        # how often `--wait` re-tries the runner lock


@dataclass(frozen=True)
class MigrationsConfig:
    database: str | None  # None: no database configured (migrations disabled)
    dir: str = DEFAULT_DIR
    table: str = DEFAULT_TABLE
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    backoff_max: float = DEFAULT_BACKOFF_MAX
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_pause: float = DEFAULT_BATCH_PAUSE
    dir_explicit: bool = False   # `dir` was set in the file: a missing directory is an error, not "none"
    file: str = ""               # the config file, for errors that name [migrations] dir
    backfill_threshold: int = 10_000  # rows an unbatched UPDATE/DELETE may touch (analysis.DEFAULT_BACKFILL_THRESHOLD)

    @property
    def per_release(self) -> bool:
        return RELEASE_PLACEHOLDER in self.dir


def load(t: Table, env: dict[str, str]) -> MigrationsConfig:
    database = t.str("database", env.get(DEFAULT_DATABASE_ENV))
    table = t.str("table", DEFAULT_TABLE)
    if not table.replace("_", "").isalnum() or table[0].isdigit():
        raise t.error("table", "a plain SQL identifier (letters, digits, _)", table)
    directory = t.str("dir", DEFAULT_DIR)
    if not directory.strip():
        raise t.error("dir", "a directory, e.g. \"migrations\" or \"{release}/migrations\"", directory)
    if directory.count("{") != directory.count(RELEASE_PLACEHOLDER):
        raise t.error("dir", "a path where the only placeholder is {release}", directory)
    cfg = MigrationsConfig(
        database=database or None,
        dir=directory,
        table=table,
        lock_timeout=t.duration("lock_timeout", DEFAULT_LOCK_TIMEOUT),
        statement_timeout=t.duration("statement_timeout", DEFAULT_STATEMENT_TIMEOUT),
        retries=t.int("retries", DEFAULT_RETRIES, min=0, max=100),
        backoff=t.duration("backoff", DEFAULT_BACKOFF),
        backoff_max=t.duration("backoff_max", DEFAULT_BACKOFF_MAX),
        batch_size=t.int("batch_size", DEFAULT_BATCH_SIZE, min=1),
        batch_pause=t.duration("batch_pause", DEFAULT_BATCH_PAUSE),
        dir_explicit=t.has("dir"),
        file=t.file,
        backfill_threshold=t.int("backfill_threshold", 10_000, min=0),
    )
    t.finish()
    return cfg
