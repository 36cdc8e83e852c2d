"""Release directories made by the daemon: exported from git or an archive, built, pruned.

`deploy VERSION --git REF` (or `--archive FILE.tar.gz`) names a revision instead of a directory.
The daemon, on the host that runs the app, exports it into `releases/VERSION` beside the config
(`[releases] dir`), then runs `[app] build` there before the slot starts. Both are steps of the
prepare phase (kind `build`), so a failure stops the deploy before anything users see changes and
the directory this deploy created is removed again.

A release directory carries `.changeover-release.json`: where it came from (the commit, or the
archive's sha256) and the build that completed in it. Deploying the same version from the same
revision again reuses the directory; from another revision it is refused (the directory may be
the one a slot runs from). A build never runs in a directory a running slot uses (`npm ci`
would delete node_modules under the live app). Pruning (`[releases] keep`) only removes
directories that carry the marker and that no slot uses.

This module is the layout: where release directories are, where their code comes from (`Source`),
their marker, which are in use, pruning. export.py exports one; build_steps.py runs the prepare
phase's steps and `[app] build`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from changeover.config import Config
from changeover.errors import UsageError
from changeover.releases import MARKER
from changeover.state import State

_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")



@dataclass(frozen=True)
class Source:
    """Where a release's code comes from: a git revision or an archive (an absolute path)."""

    git: str | None = None
    archive: str | None = None

    @classmethod
    def of(cls, git: str | None, archive: str | None) -> Source | None:
        if git and archive:
            raise UsageError("--git and --archive: give one of them")
        if git is not None:
            if not git or git.startswith("-"):
                raise UsageError(f"--git {git!r}: expected a branch, tag or commit")
            return cls(git=git)
        if archive is not None:
            if not os.path.isabs(archive):
                raise UsageError(f"--archive {archive}: expected an absolute path")
            return cls(archive=archive)
        return None

    def describe(self) -> str:
        return f"git {self.git}" if self.git is not None else f"archive {Path(self.archive or '').name}"


def releases_root(config: Config) -> Path:
    d = Path(config.releases.dir).expanduser()
    return (d if d.is_absolute() else config.root / d).resolve()


def release_dir(config: Config, version: str) -> Path:
    """releases/VERSION; the version must be a plain directory name."""
    if not _VERSION.fullmatch(version):
        raise UsageError(f"version {version!r}: with --git/--archive it names a directory, so it may hold "
                         "letters, digits and . _ + - (not starting with . or -)")
    return releases_root(config) / version


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(path: Path, data: dict[str, Any]) -> None:
    tmp = path / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path / MARKER)


def in_use(state: State) -> set[Path]:
    """Directories of the releases a slot holds (starting, live, standby, stopping)."""
    out = set()
    for name in ("blue", "green"):
        s = state.slot(name)
        rel = state.release(s.release_id) if s.state != "empty" else None
        if rel is not None:
            out.add(Path(rel.path).resolve())
    return out


# -- pruning --------------------------------------------------------------------------------------
def prune(config: Config, keep_paths: set[Path]) -> list[Path]:
    """Remove release directories beyond the newest `[releases] keep`, never one in keep_paths
    (live, standby, the one being deployed) and never one changeover did not make."""
    root = releases_root(config)
    if not root.is_dir():
        return []
    ours = []
    for d in root.iterdir():
        if d.name.startswith(".") or not d.is_dir() or d.is_symlink():
            continue
        marker = read_marker(d)
        if marker is not None and marker.get("identity"):   # exported by a deploy, not put there by hand
            ours.append((float(marker.get("exported_at") or 0), d))
    ours.sort(reverse=True)
    removed = []
    for _, d in ours[config.releases.keep:]:
        if d.resolve() in keep_paths:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
