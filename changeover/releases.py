"""`[app] build*` and `[releases]`: how a release directory is made from a git revision or an
archive, built, and pruned. The loaders are called from config.load(); the work is done by the
daemon (daemon/builds.py, export.py, build_steps.py), on the host that runs the app.

    [app]
    build = ["npm", "ci", "--omit=dev"]   # any argv, run in the release directory before it starts
    build_timeout = "10m"
    build_cache = ".cache/build"          # shared by every release's build: $CHANGEOVER_BUILD_CACHE

    [releases]
    dir = "releases"                      # releases/VERSION, beside the config
    keep = 5                              # older release directories are pruned (never live/standby)
    repo = "."                            # where `deploy --git REF` reads from: a path or a git URL
    subdir = "app"                        # export only this directory of the repository
"""

from __future__ import annotations

from dataclasses import dataclass

from changeover.tables import Table

DEFAULT_BUILD_TIMEOUT = 600.0   # seconds: an `npm ci` on a cold cache takes minutes, not hours
DEFAULT_RELEASES_DIR = "releases"
DEFAULT_KEEP = 5
DEFAULT_REPO = "."
CACHE_ENV = "CHANGEOVER_BUILD_CACHE"
MARKER = ".changeover-release.json"   # in every release directory a deploy exported or built


@dataclass(frozen=True)
class BuildConfig:
    argv: tuple[str, ...] = ()      # empty: nothing to build
    timeout: float = DEFAULT_BUILD_TIMEOUT
    cache: str | None = None        # relative to the config file's directory


@dataclass(frozen=True)
class ReleasesConfig:
    dir: str = DEFAULT_RELEASES_DIR  # relative to the config file's directory
    keep: int = DEFAULT_KEEP
    repo: str = DEFAULT_REPO         # a path (relative to the config's directory) or a URL
    subdir: str | None = None        # None: with the default repo, the config's directory inside it


def load_build(t: Table) -> BuildConfig:
    """The build keys of [app] (the caller finishes the table)."""
    argv = t.str_list("build", [])
    cache = t.str("build_cache", "") or None
    if cache is not None and not cache.strip():
        raise t.error("build_cache", "a directory path", cache)
    return BuildConfig(argv=tuple(argv), timeout=t.duration("build_timeout", DEFAULT_BUILD_TIMEOUT), cache=cache)


def load_releases(t: Table) -> ReleasesConfig:
    directory = t.str("dir", DEFAULT_RELEASES_DIR)
    if not directory.strip():
        raise t.error("dir", "a directory, e.g. \"releases\"", directory)
    repo = t.str("repo", DEFAULT_REPO)
    if not repo.strip():
        raise t.error("repo", "a git repository: a path or a URL", repo)
    subdir = t.str("subdir", "").strip("/") or None
    if subdir is not None and ".." in subdir.split("/"):
        raise t.error("subdir", "a directory inside the repository", subdir)
    cfg = ReleasesConfig(dir=directory, keep=t.int("keep", DEFAULT_KEEP, min=1, max=1000), repo=repo,
                         subdir=subdir)
    t.finish()
    return cfg
