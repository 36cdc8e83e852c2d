"""The one exception tree of changeover.

Every error a user can meet is one of these; foreign exceptions (OSError, psycopg, redis,
httpx, tomllib) are translated where they enter, so the CLI prints a message and an exit code,
never a traceback::

    ChangeoverError                  exit 1   anything we expected could go wrong
    ├── ConfigError                  exit 2   changeover.toml / .env: names file, key, what was expected
    ├── UsageError                   exit 2   bad command-line input
    ├── DaemonError                  exit 3   the daemon is not running / not reachable / protocol error
    ├── DeployError                  exit 1   a deploy failed; the old version is still live
    │   ├── DeployInProgress         exit 1   another deploy holds the lock (names it)
    │   └── SlotStartError           exit 1   a slot did not become ready (last health error, log tail)
    ├── RollbackError                exit 1   nothing to roll back to, or the rollback failed
    ├── CheckFailed                  exit 1   a gate (pre-deploy, smoke, flow...) failed
    ├── StateWriteError              exit 1   the daemon's state could not be written (disk full, I/O)
    └── MigrationError               exit 1   a migration or its lint failed
        ├── MigrationLockHeld        exit 1   another runner holds the advisory lock
        ├── ChecksumMismatch         exit 1   an applied migration's file changed
        └── LintFailed               exit 1   unsafe statements without --allow-unsafe
"""

from __future__ import annotations


class ChangeoverError(Exception):
    """Base of every error changeover reports to a user."""

    exit_code = 1


class ConfigError(ChangeoverError):
    """A config file is invalid: the message names the file, the key and what was expected."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class UsageError(ChangeoverError):
    exit_code = 2


class DaemonError(ChangeoverError):
    exit_code = 3


class DeployError(ChangeoverError):
    pass


class DeployInProgress(DeployError):
    pass


class SlotStartError(DeployError):
    pass


class RollbackError(ChangeoverError):
    pass


class CheckFailed(ChangeoverError):
    pass


class MigrationError(ChangeoverError):
    pass


class MigrationLockHeld(MigrationError):
    pass


class ChecksumMismatch(MigrationError):
    pass


class LintFailed(MigrationError):
    pass


class StateWriteError(ChangeoverError):
    """A write to `.changeover/` failed (sqlite "database or disk is full", ENOSPC, I/O error).
    `disk_full` says whether freeing space is the cure."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        self.disk_full = disk_full
        super().__init__(message)
