"""Release builds: `deploy --git/--archive` exports into releases/VERSION, `[app] build` runs there
before the slot starts (output streamed and logged, a timeout, a shared cache), a failing build
fails the deploy before anything users see changes, and `[releases] keep` prunes old directories
but never the live or standby one's. Real git, real tar, a real daemon and real app processes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from changeover import config as config_mod
from changeover.daemon import builds, export
from changeover.errors import ConfigError, DeployError, UsageError
from tests.daemon.harness import EXAMPLE, Project

PY = json.dumps(sys.executable)


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def commit_app(repo: Path, subdir: str, message: str, extra: dict[str, str] | None = None) -> str:
    app = repo / subdir if subdir else repo
    app.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        git(repo, "init", "-q", "-b", "main")
    shutil.copy(EXAMPLE, app / "server.py")
    for name, text in (extra or {}).items():
        (app / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def cfg_at(root: Path, text: str) -> config_mod.Config:
    (root / "changeover.toml").write_text(text)
    return config_mod.load(root / "changeover.toml")


APP = '[app]\ncommand = ["python3", "server.py", "$PORT"]\n'


# -- export, without a daemon ----------------------------------------------------------------------
def test_export_git_default_repo_is_the_configs_directory_of_its_repository(tmp_path: Path) -> None:
    sha = commit_app(tmp_path, "site", "v1")
    cfg = cfg_at(tmp_path / "site", APP)
    detail = asyncio.run(export.export(cfg, "v1", builds.Source(git="main")))
    dest = tmp_path / "site" / "releases" / "v1"
    assert (dest / "server.py").read_bytes() == EXAMPLE.read_bytes()
    assert not (dest / "site").exists()                 # the subtree, not the whole repository
    assert (dest / "REVISION").read_text().strip() == sha
    assert (builds.read_marker(dest) or {})["identity"] == f"git:{sha}"
    assert sha[:12] in detail


def test_export_same_revision_is_reused_another_is_refused(tmp_path: Path) -> None:
    commit_app(tmp_path, "", "v1")
    cfg = cfg_at(tmp_path, APP + '[releases]\nrepo = "."\ndir = "out"\n')
    asyncio.run(export.export(cfg, "v1", builds.Source(git="main")))
    again = asyncio.run(export.export(cfg, "v1", builds.Source(git="main")))
    assert "reusing" in again
    commit_app(tmp_path, "", "v2", {"CHANGED": "x"})
    with pytest.raises(DeployError, match=r"already holds v1 from commit .* name this release differently"):
        asyncio.run(export.export(cfg, "v1", builds.Source(git="main")))
    (tmp_path / "out" / "handmade").mkdir()
    with pytest.raises(DeployError, match="was not made by changeover"):
        asyncio.run(export.export(cfg, "handmade", builds.Source(git="main")))


def test_export_errors_name_what_is_wrong(tmp_path: Path) -> None:
    commit_app(tmp_path / "repo", "", "v1")
    cfg = cfg_at(tmp_path, APP + '[releases]\nrepo = "repo"\nsubdir = "nope"\n')
    with pytest.raises(DeployError, match="no such branch, tag or commit"):
        asyncio.run(export.export(cfg, "v1", builds.Source(git="no-such-branch")))
    with pytest.raises(DeployError, match="has no directory 'nope'"):
        asyncio.run(export.export(cfg, "v1", builds.Source(git="main")))
    cfg = cfg_at(tmp_path, APP + '[releases]\nrepo = "elsewhere"\n')
    with pytest.raises(DeployError, match="does not exist"):
        asyncio.run(export.export(cfg, "v1", builds.Source(git="main")))
    with pytest.raises(UsageError, match="names a directory"):
        builds.release_dir(cfg, "../v1")
    with pytest.raises(UsageError, match="one of them"):
        builds.Source.of("main", "/tmp/a.tar.gz")
    with pytest.raises(UsageError, match="branch, tag or commit"):
        builds.Source.of("--upload-pack=x", None)


def test_export_archive_strips_one_top_directory_and_refuses_escapes(tmp_path: Path) -> None:
    src = tmp_path / "shop-1.0"
    src.mkdir()
    shutil.copy(EXAMPLE, src / "server.py")
    archive = tmp_path / "shop.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="shop-1.0")
    cfg = cfg_at(tmp_path, APP)
    asyncio.run(export.export(cfg, "v1", builds.Source(archive=str(archive))))
    assert (tmp_path / "releases" / "v1" / "server.py").is_file()
    assert (builds.read_marker(tmp_path / "releases" / "v1") or {})["identity"].startswith("archive:sha256:")

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DeployError, match="cannot unpack"):
        asyncio.run(export.export(cfg, "v2", builds.Source(archive=str(evil))))
    assert not (tmp_path / "outside.txt").exists()
    assert not (tmp_path / "releases" / "v2").exists()
    assert not list((tmp_path / "releases").glob(".*"))   # no partial directory left


def test_prune_keeps_the_newest_and_those_in_use_and_never_hand_made_ones(tmp_path: Path) -> None:
    commit_app(tmp_path / "repo", "", "v1")
    cfg = cfg_at(tmp_path, APP + '[releases]\nrepo = "repo"\nkeep = 2\n')
    for v in ("v1", "v2", "v3", "v4"):
        asyncio.run(export.export(cfg, v, builds.Source(git="main")))
    (tmp_path / "releases" / "by-hand").mkdir()
    removed = builds.prune(cfg, {(tmp_path / "releases" / "v1").resolve()})
    assert sorted(p.name for p in removed) == ["v2"]
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == ["by-hand", "v1", "v3", "v4"]


def test_config_keys_and_their_errors(tmp_path: Path) -> None:
    cfg = cfg_at(tmp_path, APP + 'build = ["npm", "ci"]\nbuild_timeout = "2m"\nbuild_cache = ".cache/b"\n'
                 '[releases]\ndir = "/srv/r"\nkeep = 3\nrepo = "git@example.com:shop.git"\nsubdir = "app/"\n')
    assert cfg.app is not None and cfg.app.build.argv == ("npm", "ci") and cfg.app.build.timeout == 120
    assert cfg.releases.keep == 3 and cfg.releases.subdir == "app" and cfg.releases.dir == "/srv/r"
    for bad, key in (('build = "npm ci"', "app.build"), ('build_timeout = "soon"', "app.build_timeout")):
        with pytest.raises(ConfigError, match=key):
            cfg_at(tmp_path, APP + bad + "\n")
    for bad, key in (("keep = 0", "releases.keep"), ('subdir = "../x"', "releases.subdir"),
                     ('kep = 3', "releases.kep")):
        with pytest.raises(ConfigError, match=key):
            cfg_at(tmp_path, APP + "[releases]\n" + bad + "\n")


# -- through the daemon ----------------------------------------------------------------------------
def build_script(body: str) -> str:
    return f'build = [{PY}, "-c", {json.dumps(body)}]\n'


def site(tmp_path: Path, app_extra: str, extra: str = "") -> Project:
    p = Project(tmp_path / "site")
    p.root.mkdir()
    p.write(app=app_extra, extra='[releases]\nrepo = "../repo"\nkeep = 1\n' + extra)
    return p


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    commit_app(tmp_path / "repo", "", "v1")
    return tmp_path / "repo"


def test_deploy_git_builds_streams_logs_caches_and_prunes(tmp_path: Path, repo: Path) -> None:
    body = ("import os, pathlib; print('building', os.environ['CHANGEOVER_RELEASE']); "
            "pathlib.Path('built.txt').write_text(os.environ['CHANGEOVER_BUILD_CACHE']); print('done')")
    p = site(tmp_path, build_script(body) + 'build_cache = "cache"\n')
    try:
        p.start_daemon()
        out = p.cli("deploy", "v1", "--git", "main")
        assert "building v1" in out.stderr and "done" in out.stderr   # streamed to the CLI
        rel = p.root / "releases" / "v1"
        assert (rel / "built.txt").read_text() == str((p.root / "cache").resolve())
        assert "building v1" in (p.root / ".changeover" / "logs" / "build" / "v1.log").read_text()
        assert get(p.url("/"))[0] == 200

        commit_app(repo, "", "v2", {"CHANGED": "2"})
        p.cli("deploy", "v2", "--git", "main")
        commit_app(repo, "", "v3", {"CHANGED": "3"})
        p.cli("deploy", "v3", "--git", "main")
        # keep = 1, but when v3 was exported v1 was still the warm standby: kept.
        assert sorted(d.name for d in (p.root / "releases").iterdir()) == ["v1", "v2", "v3"]
        hist = json.loads(p.cli("history", "--steps", "--json").stdout)
        kinds = [s.get("kind") for s in hist[0]["steps"]]
        assert kinds[:2] == ["build", "build"]                     # export, then build: before pre-checks
        # The same version and commit again (a redeploy): reused and not rebuilt; v1 (no slot uses
        # it now) is pruned, v2 (the standby) is not.
        p.cli("deploy", "v3", "--git", "main")
        hist = json.loads(p.cli("history", "--steps", "--json").stdout)
        details = " ".join(str(s.get("detail")) for s in hist[0]["steps"])
        assert "reusing" in details and "already built" in details and "removed v1" in details
        assert sorted(d.name for d in (p.root / "releases").iterdir()) == ["v2", "v3"]
    finally:
        p.teardown()


def test_failing_build_fails_before_anything_changes_and_removes_the_release(tmp_path: Path, repo: Path) -> None:
    body = "import os, sys; print('compiling'); sys.exit(0 if os.environ['CHANGEOVER_RELEASE'] == 'v1' else 3)"
    p = site(tmp_path, build_script(body))
    try:
        p.start_daemon()
        p.cli("deploy", "v1", "--git", "main")
        commit_app(repo, "", "v2", {"CHANGED": "2"})
        bad = p.cli("deploy", "v2", "--git", "main", check=False)
        assert bad.returncode == 1
        assert "exited with 3: compiling" in bad.stderr and "v1 is still live" in bad.stderr
        assert not (p.root / "releases" / "v2").exists()          # the undo removed what it exported
        st = p.status()
        assert st["live"]["version"] == "v1" and not st.get("standby")
        hist = json.loads(p.cli("history", "--steps", "--json").stdout)
        assert hist[0]["state"] == "failed"
        assert not any(s.get("kind") in ("migrate", "start") for s in hist[0]["steps"])
    finally:
        p.teardown()


def test_build_timeout_kills_the_build_and_what_it_started(tmp_path: Path, repo: Path) -> None:
    body = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(300)']); open('child.pid', 'w').write(str(c.pid)); print('waiting', flush=True); "
            "time.sleep(300)")
    p = site(tmp_path, build_script(body) + 'build_timeout = "1s"\n')
    try:
        p.start_daemon()
        bad = p.cli("deploy", "v1", "--git", "main", check=False)
        assert bad.returncode == 1 and "timed out after 1s ([app] build_timeout)" in bad.stderr
        log = (p.root / ".changeover" / "logs" / "build" / "v1.log").read_text()
        assert "waiting" in log and "timed out" in log
        # The child was in the build's process group: gone too.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _sleepers(p.root):
            time.sleep(0.05)
        assert not _sleepers(p.root)
    finally:
        p.teardown()


def _sleepers(root: Path) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
                cwd = os.readlink(d / "cwd")
            except OSError:
                continue
            if b"time.sleep(300)" in cmd and (cwd.startswith(str(root)) or "(deleted)" in cwd):
                out.append(int(d.name))
    return out


def test_deploy_archive_through_the_cli(tmp_path: Path) -> None:
    src = tmp_path / "pkg" / "shop-2.0"
    src.mkdir(parents=True)
    shutil.copy(EXAMPLE, src / "server.py")
    archive = tmp_path / "shop-2.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="shop-2.0")
    p = Project(tmp_path / "site")
    p.root.mkdir()
    p.write()
    try:
        p.start_daemon()
        p.cli("deploy", "v2", "--archive", str(archive))
        assert (p.root / "releases" / "v2" / "server.py").is_file()
        assert get(p.url("/"))[1].startswith(b"hello from v2")
        both = p.cli("deploy", "v3", "--archive", str(archive), "--path", str(src), check=False)
        assert both.returncode == 2 and "exactly one of" in both.stderr
    finally:
        p.teardown()
