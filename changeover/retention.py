"""`[state]` and `[logs]`: how much history a long-lived host keeps, and who may read its logs.

    [state]
    keep_deployments = 500     # older finished deployments (their steps and checks) are pruned;
                               # never an in-flight one, never a release a slot runs
    keep_events = 10000        # the newest events are kept

    [logs]
    max_bytes = 10485760       # daemon.log is rotated past this (0: never)
    backups = 5                # daemon.log.1 ... daemon.log.5
    group = "adm"              # log files 0640 and directories 0750 for this group (default: 0600/0700)

The loaders are called from config.load(); the state prunes itself (state.py), the daemon's log
handler rotates (daemon/logs.py); the proxy worker and the shared front bound their own logs
with the same defaults (logs.bound_own_log).
"""

from __future__ import annotations

import grp
from dataclasses import dataclass

from changeover.tables import Table

DEFAULT_KEEP_DEPLOYMENTS = 500
DEFAULT_KEEP_EVENTS = 10_000
DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_LOG_BACKUPS = 5


@dataclass(frozen=True)
class StateRetention:
    keep_deployments: int = DEFAULT_KEEP_DEPLOYMENTS
    keep_events: int = DEFAULT_KEEP_EVENTS


@dataclass(frozen=True)
class LogsConfig:
    max_bytes: int = DEFAULT_LOG_MAX_BYTES
    backups: int = DEFAULT_LOG_BACKUPS
    group: str | None = None     # a group name: logs readable by it (0640), e.g. for a log shipper


def load_state(t: Table) -> StateRetention:
    cfg = StateRetention(keep_deployments=t.int("keep_deployments", DEFAULT_KEEP_DEPLOYMENTS, min=10),
                         keep_events=t.int("keep_events", DEFAULT_KEEP_EVENTS, min=100))
    t.finish()
    return cfg


def load_logs(t: Table) -> LogsConfig:
    group = t.str("group", "") or None
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise t.error("group", "the name of a group that exists on this host", group) from None
    cfg = LogsConfig(max_bytes=t.int("max_bytes", DEFAULT_LOG_MAX_BYTES, min=0),
                     backups=t.int("backups", DEFAULT_LOG_BACKUPS, min=0, max=100), group=group)
    t.finish()
    return cfg
