"""What the daemon's state says about the releases that run: which is live, which is the warm
standby, where their directories are and when they were deployed.

Read through changeover.state.State's public read methods, never its tables. A migration is
*needed* by a running release when that release applied it (its tag) or when it was applied at or
before the release's deploy began: the release's code was built against that schema. Rolling such
a migration back breaks the release that serves users (or the one a rollback would return to).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from changeover.errors import MigrationError
from changeover.migrations.history import Applied

if TYPE_CHECKING:
    from changeover.config import Config
    from changeover.state import State

SLOT_NAMES = ("blue", "green")
RUNNING = ("live", "standby")


@dataclass(frozen=True)
class Running:
    slot: str
    role: str           # live | standby
    version: str
    path: str
    deployed_at: float  # when its deploy began (the release's creation in the state)


def state_path(config: Config) -> Path:
    return config.state_dir / "state.db"


def _open(config: Config) -> State | None:
    path = state_path(config)
    if not path.is_file():
        return None
    from changeover.state import State

    try:
        return State(path)
    except (sqlite3.Error, OSError) as e:
        raise MigrationError(f"cannot read the daemon's state {path}: {e}") from None


def running(config: Config) -> list[Running]:
    """The live and standby releases ([] without a state file)."""
    st = _open(config)
    if st is None:
        return []
    try:
        out = []
        for name in SLOT_NAMES:
            slot = st.slot(name)
            role = str(slot.state)
            if role not in RUNNING or slot.release_id is None:
                continue
            rel = st.release(slot.release_id)
            if rel is not None:
                out.append(Running(name, role, rel.version, rel.path, rel.created_at))
        return out
    except sqlite3.Error as e:
        raise MigrationError(f"cannot read the daemon's state {state_path(config)}: {e}") from None
    finally:
        st.close()


def live(config: Config) -> Running | None:
    return next((r for r in running(config) if r.role == "live"), None)


def leaving(config: Config) -> set[str]:
    """Releases a rollback in progress is moving away from: their needs no longer count (the daemon
    undoes their migrations after switching back, while they are still the standby)."""
    st = _open(config)
    if st is None:
        return set()
    try:
        return {str(d.from_version) for d in st.running_deployments()
                if str(d.kind) == "rollback" and d.from_version}
    except (sqlite3.Error, AttributeError):
        return set()
    finally:
        st.close()


def needed_by(h: Applied, releases: list[Running]) -> list[Running]:
    """The running releases that need the applied migration `h`."""
    return [r for r in releases
            if h.release == r.version or (h.applied_ts is not None and h.applied_ts <= r.deployed_at)]


def older_release_live(config: Config) -> bool | None:
    """Is an older release still running beside the live one? None when the state cannot tell
    (no state file, no live slot)."""
    st = _open(config)
    if st is None:
        return None
    try:
        slots = [st.slot(n) for n in SLOT_NAMES]
    except sqlite3.Error:
        return None
    finally:
        st.close()
    lives = [s for s in slots if str(s.state) == "live"]
    if len(lives) != 1:
        return None
    up = ("live", "standby", "starting", "stopping")
    return any(str(s.state) in up and s.release_id is not None and s.release_id != lives[0].release_id
               and s.instances for s in slots if s is not lives[0])
