"""The daemon's SQLite store: releases, slots, deployments with their steps, events.

Every step is written *before* it acts (state=running), and finished after; a daemon killed in
between restarts, reads what was in flight, and settles it (see daemon/recovery). Writes are
synchronous=FULL: deploys are rare and the truth matters more than microseconds.

A failed write (a full disk, an I/O error) is one error, StateWriteError, naming the cause; the
pipeline unwinds on it and records the outcome once a write succeeds again. Text written here
(step details, reasons, checks, events) is masked (changeover.redact), and the env of every
release read or written is remembered so its secrets are masked everywhere by value. The store
prunes itself ([state] keep_deployments, keep_events) and never what a slot or an in-flight
deployment still needs.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from changeover import redact
from changeover.daemon.model import (
    FINISHED,
    IN_FLIGHT,
    DeploymentState,
    SlotState,
    StepKind,
    check_deployment,
    check_slot,
)
from changeover.errors import StateWriteError
from changeover.retention import StateRetention
from changeover.state_schema import (
    Deployment,
    Release,
    SlotRecord,
    Step,
    connect,
    deployment_row,
    release_row,
    step_row,
)

log = logging.getLogger("changeover.state")
P = ParamSpec("P")
R = TypeVar("R")
PRUNE_EVERY = 200   # events written between two prunes of the events table
SLOTS = ("blue", "green")
# history events of the traffic modes (State.set_mode)
MODE_EVENTS = ("paused", "resumed", "maintenance_on", "maintenance_off")


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(e)
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def write_error(path: Path, e: BaseException) -> StateWriteError:
    """The one translation of a failed write into what a user reads."""
    where = f"{path.parent.name}/{path.name}"
    if is_disk_full(e):
        return StateWriteError(f"disk full: cannot write {where} ({e}); free space on the filesystem of "
                               f"{path.parent}", disk_full=True)
    return StateWriteError(f"cannot write {where}: {e}")


def _writes(fn: Callable[P, R]) -> Callable[P, R]:
    """A write method: sqlite and OS errors become StateWriteError."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (sqlite3.OperationalError, OSError) as e:
            self = args[0]
            assert isinstance(self, State)
            raise write_error(self.path, e) from e
    return wrapper


def _text(value: str | None) -> str | None:
    return None if value is None else redact.redact_text(value)


class State:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """readonly: for readers beside a running daemon (the CLI without a daemon, tests, the
        migrations' release checks); nothing is created or upgraded."""
        self.path = path
        if readonly:
            self.db = connect(path, readonly=True)
            return
        self.retention = StateRetention()   # the daemon sets [state] (retention.py)
        self._events_written = 0
        try:
            self.db = connect(path, readonly=False)
            now = time.time()
            for name in SLOTS:
                self.db.execute("INSERT OR IGNORE INTO slots(name, state, updated_at) VALUES (?, 'empty', ?)",
                                (name, now))
        except (sqlite3.OperationalError, OSError) as e:
            raise write_error(path, e) from e
        for row in self.db.execute("SELECT env FROM releases"):   # mask their secrets from now on
            redact.remember_env(json.loads(row["env"]))


    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (SQLITE_FULL does): a second ROLLBACK would hide
            # the real error, and a transaction left open would refuse every later write.
            if self.db.in_transaction:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error as e:
                    log.warning("rollback after a failed write failed too: %s", e)
            raise

    # -- releases -----------------------------------------------------------------------------
    @_writes
    def add_release(self, version: str, path: str, command: list[str] | tuple[str, ...],
                    env: dict[str, str], config: dict[str, Any] | None = None) -> Release:
        redact.remember_env(env)
        cur = self.db.execute(
            "INSERT INTO releases(version, path, command, env, created_at, config) VALUES (?, ?, ?, ?, ?, ?)",
            (version, path, json.dumps(list(command)), json.dumps(env), time.time(), json.dumps(config or {})))
        rel = self.release(int(cur.lastrowid or 0))
        assert rel is not None
        return rel

    def release(self, release_id: int | None) -> Release | None:
        if release_id is None:
            return None
        row = self.db.execute("SELECT * FROM releases WHERE id = ?", (release_id,)).fetchone()
        return release_row(row) if row else None

    def latest_release(self, version: str) -> Release | None:
        row = self.db.execute("SELECT * FROM releases WHERE version = ? ORDER BY id DESC LIMIT 1",
                              (version,)).fetchone()
        return release_row(row) if row else None

    # -- slots --------------------------------------------------------------------------------
    def slot(self, name: str) -> SlotRecord:
        row = self.db.execute("SELECT * FROM slots WHERE name = ?", (name,)).fetchone()
        return SlotRecord(row["name"], row["state"], row["release_id"], json.loads(row["instances"]), row["updated_at"])

    def slots(self) -> dict[str, SlotRecord]:
        return {n: self.slot(n) for n in SLOTS}

    @_writes
    def transition_slot(self, name: str, new: SlotState | str, *, release_id: int | None = -1,
                        instances: list[dict[str, Any]] | None = None, why: str = "") -> None:
        """The one writer of a slot's state. release_id=-1 and instances=None keep the current values."""
        new = SlotState(new)
        cur = self.slot(name)
        was = SlotState(cur.state)
        check_slot(was, new)
        rid = cur.release_id if release_id == -1 else release_id
        inst = cur.instances if instances is None else instances
        with self.tx() as db:
            db.execute("UPDATE slots SET state = ?, release_id = ?, instances = ?, updated_at = ? WHERE name = ?",
                       (new, rid, json.dumps(inst), time.time(), name))
            self._event(db, "slot", name, state=str(new), was=str(was), why=why)
        log.info("slot=%s state=%s was=%s%s", name, new, was, f" ({why})" if why else "")

    @_writes
    def set_instances(self, name: str, instances: list[dict[str, Any]]) -> None:
        """The slot's instance records (pid, port, start time): data, not a state transition."""
        self.db.execute("UPDATE slots SET instances = ? WHERE name = ?", (json.dumps(instances), name))

    def live_slot(self) -> str | None:
        for s in self.slots().values():
            if s.state == SlotState.LIVE:
                return s.name
        return None

    @_writes
    def swap_live(self, new_live: str, why: str = "switch") -> None:
        """The one write that moves the live slot: the old live one becomes the standby."""
        with self.tx() as db:
            now = time.time()
            rows = {r["name"]: SlotState(r["state"]) for r in db.execute("SELECT name, state FROM slots")}
            if rows[new_live] == SlotState.LIVE:
                return
            check_slot(rows[new_live], SlotState.LIVE)
            for name, was in rows.items():
                if was == SlotState.LIVE:
                    db.execute("UPDATE slots SET state = 'standby', updated_at = ? WHERE name = ?", (now, name))
                    self._event(db, "slot", name, state="standby", was=str(was), why=why)
                    log.info("slot=%s state=standby was=%s (%s)", name, was, why)
            db.execute("UPDATE slots SET state = 'live', updated_at = ? WHERE name = ?", (now, new_live))
            self._event(db, "slot", new_live, state="live", was=str(rows[new_live]), why=why)
        log.info("slot=%s state=live was=%s (%s)", new_live, rows[new_live], why)

    # -- deployments and steps ----------------------------------------------------------------
    @_writes
    def begin_deployment(self, kind: str, version: str, release_id: int | None, from_version: str | None,
                         slot: str | None, actor: str | None = None, reason: str | None = None) -> int:
        self.prune()
        cur = self.db.execute(
            "INSERT INTO deployments(kind, version, release_id, from_version, slot, state, reason, actor, started_at)"
            " VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?)",
            (kind, version, release_id, from_version, slot, _text(reason), actor, time.time()))
        return int(cur.lastrowid or 0)

    @_writes
    def transition_deployment(self, dep_id: int, new: DeploymentState | str, reason: str | None = None) -> None:
        """The one writer of a deployment's state, checked against the model's table and logged."""
        new = DeploymentState(new)
        reason = _text(reason)
        with self.tx() as db:
            row = db.execute("SELECT state FROM deployments WHERE id = ?", (dep_id,)).fetchone()
            was = DeploymentState(row["state"])
            check_deployment(was, new)
            db.execute("UPDATE deployments SET state = ?, reason = COALESCE(?, reason), finished_at = ? WHERE id = ?",
                       (new, reason, time.time() if new in FINISHED else None, dep_id))
            self._event(db, "deployment", None, deployment=dep_id, state=str(new), was=str(was), reason=reason)
        log.info("deployment=%d state=%s was=%s%s", dep_id, new, was, f" ({reason})" if reason else "")

    @_writes
    def set_window(self, dep_id: int, window: dict[str, Any] | None) -> None:
        """The observation window (wall-clock start, length, baseline): a restarted daemon resumes it."""
        self.db.execute("UPDATE deployments SET observation = ? WHERE id = ?",
                        (None if window is None else json.dumps(window), dep_id))

    @_writes
    def add_checks(self, dep_id: int, results: list[dict[str, Any]]) -> None:
        with self.tx() as db:
            row = db.execute("SELECT checks FROM deployments WHERE id = ?", (dep_id,)).fetchone()
            checks = json.loads(row["checks"]) + redact.redact_json(results)
            db.execute("UPDATE deployments SET checks = ? WHERE id = ?", (json.dumps(checks), dep_id))

    def deployment(self, dep_id: int) -> Deployment | None:
        row = self.db.execute("SELECT * FROM deployments WHERE id = ?", (dep_id,)).fetchone()
        return deployment_row(row) if row else None

    def running_deployments(self) -> list[Deployment]:
        marks = ", ".join("?" for _ in IN_FLIGHT)
        rows = self.db.execute(f"SELECT * FROM deployments WHERE state IN ({marks}) ORDER BY id", IN_FLIGHT)
        return [deployment_row(r) for r in rows]

    def deployments(self, limit: int = 20) -> list[Deployment]:
        rows = self.db.execute("SELECT * FROM deployments ORDER BY id DESC LIMIT ?", (limit,))
        return [deployment_row(r) for r in rows]

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        """Deployments, newest first, with their steps (and durations) and checks, as JSON."""
        out = []
        for d in self.deployments(limit):
            out.append({
                "id": d.id, "kind": d.kind, "version": d.version, "from": d.from_version, "slot": d.slot,
                "state": d.state, "reason": d.reason, "actor": d.actor, "started_at": d.started_at,
                "finished_at": d.finished_at, "checks": d.checks,
                "steps": [{"name": s.name, "kind": str(s.kind), "state": s.state, "detail": s.detail,
                           "duration": (s.finished_at - s.started_at) if s.finished_at else None}
                          for s in self.steps(d.id)],
            })
        return out

    @_writes
    def begin_step(self, dep_id: int, name: str, kind: StepKind | str = StepKind.NOTE,
                   detail: str | None = None) -> int:
        cur = self.db.execute(
            "INSERT INTO steps(deployment_id, name, kind, state, detail, started_at) VALUES (?, ?, ?, 'running', ?, ?)",
            (dep_id, name, str(StepKind(kind)), _text(detail), time.time()))
        return int(cur.lastrowid or 0)

    @_writes
    def end_step(self, step_id: int, state: str, detail: str | None = None) -> None:
        self.db.execute("UPDATE steps SET state = ?, detail = COALESCE(?, detail), finished_at = ? WHERE id = ?",
                        (state, _text(detail), time.time(), step_id))

    def running_step(self, deployment_kind: str | None = None) -> Step | None:
        """The step running now (of the newest deployment of that kind), if any."""
        sql = ("SELECT s.* FROM steps s JOIN deployments d ON d.id = s.deployment_id WHERE s.state = 'running'"
               + (" AND d.kind = ?" if deployment_kind else "") + " ORDER BY s.id DESC LIMIT 1")
        r = self.db.execute(sql, (deployment_kind,) if deployment_kind else ()).fetchone()
        return None if r is None else step_row(r)

    def steps(self, dep_id: int) -> list[Step]:
        rows = self.db.execute("SELECT * FROM steps WHERE deployment_id = ? ORDER BY id", (dep_id,))
        return [step_row(r) for r in rows]

    # -- events and timers ----------------------------------------------------------------------
    @_writes
    def event(self, kind: str, slot: str | None = None, **detail: Any) -> None:
        self._event(self.db, kind, slot, **detail)
        self._events_written += 1
        if self._events_written >= PRUNE_EVERY:
            self.prune_events()

    @staticmethod
    def _event(db: sqlite3.Connection, kind: str, slot: str | None, **detail: Any) -> None:
        text = redact.redact_text(json.dumps(detail, default=str))
        db.execute("INSERT INTO events(ts, kind, slot, detail) VALUES (?, ?, ?, ?)",
                   (time.time(), kind, slot, text))

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [{"ts": r["ts"], "kind": r["kind"], "slot": r["slot"], **json.loads(r["detail"])} for r in rows]

    @_writes
    def set_timer(self, name: str, due: float, **data: Any) -> None:
        self.db.execute("INSERT INTO timers(name, due, data) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE"
                        " SET due = excluded.due, data = excluded.data", (name, due, json.dumps(data)))

    def timer(self, name: str) -> tuple[float, dict[str, Any]] | None:
        row = self.db.execute("SELECT due, data FROM timers WHERE name = ?", (name,)).fetchone()
        return (float(row["due"]), json.loads(row["data"])) if row else None

    @_writes
    def clear_timer(self, name: str) -> None:
        self.db.execute("DELETE FROM timers WHERE name = ?", (name,))

    # -- traffic modes: pause and maintenance (daemon/traffic.py) ----------------------------------
    @_writes
    def set_mode(self, name: str, on: bool, event: str, *, due: float = 0.0, data: dict[str, Any] | None = None,
                 **detail: Any) -> None:
        """Pause or maintenance on (kept as the timer `mode.<name>`: `due` is a pause's end, wall
        clock) or off, with its history event, in one transaction: what a restarted daemon
        re-applies to the data plane. `data` is kept with the mode only (not in the event).
        """
        with self.tx() as db:
            if on:
                db.execute("INSERT INTO timers(name, due, data) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE"
                           " SET due = excluded.due, data = excluded.data",
                           (f"mode.{name}", due, json.dumps({**detail, **(data or {})})))
            else:
                db.execute("DELETE FROM timers WHERE name = ?", (f"mode.{name}",))
            self._event(db, event, None, **detail)
        log.info("mode=%s %s (%s)", name, "on" if on else "off", event)

    def mode(self, name: str) -> tuple[float, dict[str, Any]] | None:
        """("pause" | "maintenance") -> (due, what it was set with), or None when off."""
        return self.timer(f"mode.{name}")

    def mode_events(self, limit: int = 20) -> list[dict[str, Any]]:
        """History of the traffic modes, newest first."""
        rows = self.db.execute("SELECT * FROM events WHERE kind IN (?, ?, ?, ?) ORDER BY id DESC LIMIT ?",
                               (*MODE_EVENTS, limit))
        return [{"ts": r["ts"], "kind": r["kind"], **json.loads(r["detail"])} for r in rows]

    # -- growth ---------------------------------------------------------------------------------
    @_writes
    def prune_events(self) -> int:
        """Keep the newest [state] keep_events events."""
        self._events_written = 0
        cur = self.db.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?",
                              (self.retention.keep_events,))
        return cur.rowcount

    @_writes
    def prune(self) -> dict[str, int]:
        """Keep the newest keep_deployments deployments (older finished ones go, with their steps and
        checks), keep_events events, and the releases a slot or a kept deployment refers to."""
        keep = self.retention.keep_deployments
        finished = ", ".join(f"'{s}'" for s in FINISHED)
        with self.tx() as db:
            old = (f"SELECT id FROM deployments WHERE state IN ({finished}) AND id NOT IN "
                   "(SELECT id FROM deployments ORDER BY id DESC LIMIT ?)")
            steps = db.execute(f"DELETE FROM steps WHERE deployment_id IN ({old})", (keep,)).rowcount
            deployments = db.execute(f"DELETE FROM deployments WHERE id IN ({old})", (keep,)).rowcount
            releases = db.execute(
                "DELETE FROM releases WHERE id NOT IN (SELECT release_id FROM slots WHERE release_id IS NOT NULL)"
                " AND id NOT IN (SELECT release_id FROM deployments WHERE release_id IS NOT NULL)"
                " AND id < (SELECT MAX(id) FROM releases)").rowcount   # the newest may be about to be used
        events = self.prune_events()
        if steps or deployments or releases or events:
            log.info("state pruned: %d deployments (%d steps), %d releases, %d events", deployments, steps,
                     releases, events)
        return {"deployments": deployments, "steps": steps, "releases": releases, "events": events}
