"""Exporting a release into releases/VERSION (`deploy --git REF` or `--archive FILE.tar.gz`): from a
local repository or a mirror of a remote one, or from an archive unpacked with the 'data' filter,
staged in a hidden partial directory and renamed into place with its marker. builds.py has the
layout and the marker; build_steps.py runs this as a step of the prepare phase."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import tarfile
import time
from pathlib import Path

from changeover.config import Config
from changeover.daemon.builds import Source, read_marker, release_dir, releases_root, write_marker
from changeover.errors import DeployError
from changeover.redact import redact_text

GIT_TIMEOUT = 300.0          # a clone or fetch of the repository
_URL = re.compile(r"^([a-z][a-z0-9+.-]*://|[^/@:]+@[^/:]+:)", re.I)


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
        write_marker(content, {"version": version, "identity": identity, "described": described,
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
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except (TimeoutError, asyncio.CancelledError) as e:
        kill_group(proc.pid, signal.SIGKILL)
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


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
