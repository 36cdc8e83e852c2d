"""The daemon store's schema: its tables, the columns added since the first release (upgraded in
place on open), and the records their rows are read into. changeover/state.py reads and writes them."""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from changeover import redact
from changeover.daemon.model import DeploymentState, StepKind

SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY,
    version TEXT NOT NULL,
    path TEXT NOT NULL,
    command TEXT NOT NULL,            -- JSON argv
    env TEXT NOT NULL,                -- JSON object (file is mode 0600: it holds the app's secrets)
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,              -- empty | starting | live | standby | stopping
    release_id INTEGER REFERENCES releases(id),
    instances TEXT NOT NULL DEFAULT '[]',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,               -- deploy | rollback
    version TEXT NOT NULL,
    release_id INTEGER REFERENCES releases(id),
    from_version TEXT,
    slot TEXT,
    state TEXT NOT NULL,              -- daemon.model.DeploymentState
    reason TEXT,
    actor TEXT,
    started_at REAL NOT NULL,
    finished_at REAL,
    checks TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY,
    deployment_id INTEGER NOT NULL REFERENCES deployments(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'note', -- daemon.model.StepKind: recovery decides by it, never by name
    state TEXT NOT NULL,              -- running | ok | failed | skipped
    detail TEXT,
    started_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    slot TEXT,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS timers (
    name TEXT PRIMARY KEY,            -- e.g. standby_expiry: deadlines survive a daemon restart
    due REAL NOT NULL,                -- wall-clock time
    data TEXT NOT NULL DEFAULT '{}'
);
"""
# Columns added after the first release of the schema: (table, column, definition).
ADDED_COLUMNS = (
    ("steps", "kind", "TEXT NOT NULL DEFAULT 'note'"),
    ("deployments", "observation", "TEXT"),          # the observation window: start, length, baseline
    ("releases", "config", "TEXT NOT NULL DEFAULT '{}'"),  # [app] settings the release ran with
)


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """A read-only connection beside a running daemon, or the writer's: created mode 0600 (it holds
    the apps' secrets), WAL, synchronous=FULL, with every table and added column in place."""
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10,
                             check_same_thread=False)
        db.row_factory = sqlite3.Row
        return db
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    db = sqlite3.connect(str(path), isolation_level=None, timeout=10, check_same_thread=False)
    db.row_factory = sqlite3.Row
    if fresh:
        os.chmod(path, 0o600)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(SCHEMA)
    for table, column, definition in ADDED_COLUMNS:
        have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" {definition}')
    return db



@dataclass(frozen=True)
class Release:
    id: int
    version: str
    path: str
    command: tuple[str, ...]
    env: dict[str, str]
    created_at: float
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SlotRecord:
    name: str
    state: str
    release_id: int | None
    instances: list[dict[str, Any]]
    updated_at: float


@dataclass(frozen=True)
class Deployment:
    id: int
    kind: str
    version: str
    release_id: int | None
    from_version: str | None
    slot: str | None
    state: str
    reason: str | None
    actor: str | None
    started_at: float
    finished_at: float | None
    checks: list[dict[str, Any]]
    window: dict[str, Any] | None = None

    @property
    def status(self) -> DeploymentState:
        return DeploymentState(self.state)


@dataclass(frozen=True)
class Step:
    id: int
    deployment_id: int
    name: str
    kind: StepKind
    state: str
    detail: str | None
    started_at: float
    finished_at: float | None



def release_row(row: sqlite3.Row) -> Release:
    redact.remember_env(json.loads(row["env"]))
    return Release(row["id"], row["version"], row["path"], tuple(json.loads(row["command"])),
                   json.loads(row["env"]), row["created_at"], json.loads(row["config"] or "{}"))


def deployment_row(row: sqlite3.Row) -> Deployment:
    return Deployment(row["id"], row["kind"], row["version"], row["release_id"], row["from_version"], row["slot"],
                      row["state"], row["reason"], row["actor"], row["started_at"], row["finished_at"],
                      json.loads(row["checks"]), json.loads(row["observation"]) if row["observation"] else None)


def step_row(r: sqlite3.Row) -> Step:
    return Step(r["id"], r["deployment_id"], r["name"], StepKind(r["kind"]), r["state"], r["detail"],
                r["started_at"], r["finished_at"])
