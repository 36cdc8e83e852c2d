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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from changeover.config import Config, process_env
from changeover.daemon.model import StepKind
from changeover.daemon.procs import resolve_command
from changeover.daemon.steps import StepRunner, Undo
from changeover.errors import DeployError, UsageError
from changeover.redact import redact_text
from changeover.releases import CACHE_ENV, MARKER
from changeover.state import State
from changeover.state_schema import Release

GIT_TIMEOUT = 300.0          # a clone or fetch of the repository
KILL_GRACE = 5.0             # SIGTERM, then SIGKILL, for a build that timed out
TAIL_LINES = 15              # quoted in the error of a failed build
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_URL = re.compile(r"^([a-z][a-z0-9+.-]*://|[^/@:]+@[^/:]+:)", re.I)


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


def _write_marker(path: Path, data: dict[str, Any]) -> None:
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


# -- the prepare phase's steps ---------------------------------------------------------------------
async def prepare_release(steps: StepRunner, config: Config, release: Release, source: Source | None,
                          state: State) -> None:
    """Export (when the deploy names a revision), prune, build: the first steps of a deploy."""
    path = Path(release.path)
    if source is not None:
        created: list[Path] = []

        async def remove() -> None:
            for p in created:
                shutil.rmtree(p, ignore_errors=True)

        await steps.run(StepKind.BUILD, f"export {release.version} ({source.describe()})",
                        lambda: export(config, release.version, source, created),
                        detail=lambda d: d, undo=Undo(StepKind.CLEANUP, f"remove {path.name} release directory",
                                                      remove))
        pruned = prune(config, in_use(state) | {path.resolve()})
        if pruned:
            await steps.note("prune releases", "removed " + ", ".join(p.name for p in pruned))
    build = config.app.build if config.app is not None else None
    if build is None or not build.argv:
        return
    marker = read_marker(path) or {}
    if marker.get("build") == list(build.argv):
        await steps.note(f"build {release.version}", "already built with the same [app] build")
        return
    if path.resolve() in in_use(state):
        await steps.note(f"build {release.version}", f"{path} is in use by a running slot: not rebuilt under it")
        return

    async def emit_line(line: str) -> None:
        await steps.emit({"type": "output", "name": f"build {release.version}", "line": line})

    log = config.state_dir / "logs" / "build" / f"{release.version}.log"
    await steps.run(StepKind.BUILD, f"build {release.version}",
                    lambda: run_build(config, release, emit_line, log), detail=lambda d: d)


# -- export ---------------------------------------------------------------------------------------
async def export(config: Config, version: str, source: Source, created: list[Path] | None = None) -> str:
    """Make releases/VERSION from the source; returns what happened, for the step's detail. The
    directory is appended to `created` once it exists, so the deploy's undo removes it."""
    dest = release_dir(config, version)
    if source.git is not None:
        sha, repo, tree = await _resolve_git(config, source.git)
        identity, described = f"git:{sha}", f"commit {sha[:12]}"
    else:
        archive = Path(source.archive or "")
        if not archive.is_file():
            raise DeployError(f"archive {archive}: no such file")
        identity = f"archive:sha256:{await asyncio.to_thread(_sha256, archive)}"
        described = f"archive sha256 {identity.rsplit(':', 1)[1][:12]}"
    if dest.exists():
        marker = read_marker(dest)
        if marker is None:
            raise DeployError(f"{dest} exists and was not made by changeover: name the release differently "
                              "or remove the directory")
        if marker.get("identity") != identity:
            raise DeployError(f"{dest} already holds {version} from {marker.get('described', '?')}, not "
                              f"{described}: name this release differently (e.g. {version}-2)")
        return f"{described}, reusing {dest}"
    root = releases_root(config)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*.partial"):  # left by a daemon killed during an export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{version}.partial"
    tmp.mkdir()
    try:
        if source.git is not None:
            tarball = root / f".{version}.partial.tar"
            try:
                await _git(["-C", repo, "archive", "--format=tar", "-o", str(tarball), tree], GIT_TIMEOUT)
                await asyncio.to_thread(_extract, tarball, tmp, f"git archive of {sha[:12]}")
            finally:
                tarball.unlink(missing_ok=True)
            content = tmp
            if not (tmp / "REVISION").exists():
                (tmp / "REVISION").write_text(sha + "\n")  # the convention apps read their commit from
        else:
            await asyncio.to_thread(_extract, Path(source.archive or ""), tmp, f"archive {source.archive}")
            content = _single_top_dir(tmp)
        _write_marker(content, {"version": version, "identity": identity, "described": described,
                                "source": source.describe(), "exported_at": time.time()})
        os.rename(content, dest)
        if created is not None:
            created.append(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"{described} -> {dest}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract(tarball: Path, dest: Path, what: str) -> None:
    """Unpack with the 'data' filter: no absolute paths, no links out of dest, no devices."""
    try:
        with tarfile.open(tarball, "r:*") as tf:
            tf.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise DeployError(f"{what}: cannot unpack: {e}") from None


def _single_top_dir(tmp: Path) -> Path:
    """An archive holding one directory (`app-1.2/...`, as GitHub and `git archive --prefix` make
    them) is that directory's content."""
    entries = list(tmp.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return tmp


async def _git(args: list[str], timeout: float) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            "git", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
            start_new_session=True)
    except FileNotFoundError:
        raise DeployError("git is not installed on the daemon's host (needed by --git)") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as e:
        _kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        raise DeployError(f"git {args[2] if len(args) > 2 else ''} timed out after {timeout:g}s") from None
    if proc.returncode != 0:
        raise DeployError(redact_text(err.decode(errors="replace").strip() or f"git exited {proc.returncode}"))
    return out.decode(errors="replace").strip()


async def _resolve_git(config: Config, ref: str) -> tuple[str, str, str]:
    """(commit sha, repository to archive from, tree-ish to archive) for REF."""
    rc = config.releases
    if _URL.match(rc.repo):
        mirror = config.state_dir / "git" / (hashlib.sha1(rc.repo.encode()).hexdigest()[:16] + ".git")
        if (mirror / "HEAD").exists():
            await _git(["-C", str(mirror), "fetch", "--prune", "--quiet", "origin"], GIT_TIMEOUT)
        else:
            mirror.parent.mkdir(parents=True, exist_ok=True)
            await _git(["clone", "--mirror", "--quiet", rc.repo, str(mirror)], GIT_TIMEOUT)
        repo, prefix = str(mirror), rc.subdir or ""
    else:
        path = Path(rc.repo).expanduser()
        repo = str(path if path.is_absolute() else (config.root / path).resolve())
        if not Path(repo).exists():
            raise DeployError(f"[releases] repo {rc.repo!r}: {repo} does not exist")
        try:
            await _git(["-C", repo, "rev-parse", "--git-dir"], GIT_TIMEOUT)
        except DeployError:
            raise DeployError(f"[releases] repo {rc.repo!r}: {repo} is not a git repository") from None
        bare = await _is_bare(repo)
        if rc.subdir is None and rc.repo == "." and not bare:
            # The default: the app is the config's own directory of its repository.
            prefix = (await _git(["-C", repo, "rev-parse", "--show-prefix"], GIT_TIMEOUT)).strip("/")
        else:
            prefix = rc.subdir or ""
        if not bare:   # archive from the top: run in a subdirectory, git limits it to that one
            repo = await _git(["-C", repo, "rev-parse", "--show-toplevel"], GIT_TIMEOUT)
    try:
        sha = await _git(["-C", repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], GIT_TIMEOUT)
    except DeployError:
        raise DeployError(f"--git {ref}: no such branch, tag or commit in {rc.repo}") from None
    if prefix:
        try:
            await _git(["-C", repo, "cat-file", "-e", f"{sha}:{prefix}"], GIT_TIMEOUT)
        except DeployError:
            raise DeployError(f"--git {ref}: commit {sha[:12]} has no directory {prefix!r}") from None
    return sha, repo, f"{sha}:{prefix}" if prefix else sha


async def _is_bare(repo: str) -> bool:
    return await _git(["-C", repo, "rev-parse", "--is-bare-repository"], GIT_TIMEOUT) == "true"


# -- build ----------------------------------------------------------------------------------------
def build_env(config: Config, release: Release) -> dict[str, str]:
    """The release's own env (NODE_ENV=production makes `npm ci` skip dev dependencies), plus where
    the release is and, with [app] build_cache, the shared cache (also as npm's and pip's)."""
    env = process_env(dict(release.env))
    env["CHANGEOVER_RELEASE"] = release.version
    env["CHANGEOVER_RELEASE_DIR"] = str(Path(release.path).resolve())
    build = config.app.build if config.app is not None else None
    if build is not None and build.cache:
        cache = Path(build.cache).expanduser()
        cache = (cache if cache.is_absolute() else config.root / cache).resolve()
        cache.mkdir(parents=True, exist_ok=True)
        env[CACHE_ENV] = str(cache)
        env.setdefault("npm_config_cache", str(cache / "npm"))
        env.setdefault("PIP_CACHE_DIR", str(cache / "pip"))
    return env


async def run_build(config: Config, release: Release, emit_line: Any, log_path: Path) -> str:
    """Run [app] build in the release directory; each output line goes to the deploy's events and
    to log_path. Raises DeployError on a non-zero exit or the timeout (its process group killed)."""
    assert config.app is not None
    build = config.app.build
    cwd = Path(release.path)
    env = build_env(config, release)
    exe = resolve_command(build.argv, cwd, env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    t0 = time.monotonic()
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} build {release.version} in {cwd}: "
                  f"{shlex.join(build.argv)}\n")
        log.flush()
        proc = await asyncio.create_subprocess_exec(
            exe, *build.argv[1:], cwd=str(cwd), env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)

        async def pump() -> int:
            assert proc.stdout is not None
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    break
                line = redact_text(raw.decode(errors="replace").rstrip("\r\n"))
                log.write(line + "\n")
                log.flush()
                tail.append(line)
                await emit_line(line)
            return await proc.wait()

        try:
            rc = await asyncio.wait_for(pump(), build.timeout)
        except (TimeoutError, asyncio.CancelledError) as e:
            await _stop_group(proc)
            log.write(f"--- stopped: {'timed out' if isinstance(e, TimeoutError) else 'deploy stopped'}\n")
            if isinstance(e, asyncio.CancelledError):
                raise
            raise DeployError(f"{shlex.join(build.argv)} timed out after {build.timeout:g}s "
                              f"([app] build_timeout){_quote(tail)}; full output: {log_path}") from None
        log.write(f"--- exit {rc} after {time.monotonic() - t0:.1f}s\n")
    if rc != 0:
        raise DeployError(f"{shlex.join(build.argv)} exited with {rc}{_quote(tail)}; full output: {log_path}")
    marker = read_marker(cwd) or {"version": release.version}
    _write_marker(cwd, {**marker, "build": list(build.argv), "built_at": time.time()})
    return f"{shlex.join(build.argv)}: exit 0, {len(tail)} last lines in {log_path.name}"


def _quote(tail: collections.deque[str]) -> str:
    lines = [ln for ln in tail if ln.strip()][-5:]
    return (": " + " | ".join(lines)) if lines else ""


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE)
    except TimeoutError:
        _kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()


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
