"""The first steps of a deploy's prepare phase (kind `build`): export the release when the deploy
names a revision (export.py), prune old release directories, and run `[app] build` in the release
directory, its output streamed to the deploy and kept in logs/build/VERSION.log."""

from __future__ import annotations

import asyncio
import collections
import shlex
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from changeover.config import Config, process_env
from changeover.daemon.builds import Source, in_use, prune, read_marker, write_marker
from changeover.daemon.export import export, kill_group
from changeover.daemon.model import StepKind
from changeover.daemon.procs import resolve_command
from changeover.daemon.steps import StepRunner, Undo
from changeover.errors import DeployError
from changeover.redact import redact_text
from changeover.releases import CACHE_ENV
from changeover.state import State
from changeover.state_schema import Release

KILL_GRACE = 5.0             # SIGTERM, then SIGKILL, for a build that timed out
TAIL_LINES = 15              # quoted in the error of a failed build


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
            async with asyncio.timeout(build.timeout):
                rc = await pump()
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
    write_marker(cwd, {**marker, "build": list(build.argv), "built_at": time.time()})
    return f"{shlex.join(build.argv)}: exit 0, {len(tail)} last lines in {log_path.name}"


def _quote(tail: collections.deque[str]) -> str:
    lines = [ln for ln in tail if ln.strip()][-5:]
    return (": " + " | ".join(lines)) if lines else ""


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    kill_group(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(KILL_GRACE):
            await proc.wait()
    except TimeoutError:
        kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
