"""Migrations that know the releases: rollback refuses what a running release needs, migrations
read from the release directory, the deploy's refusal of unsafe migrations, the release's own
database URL. The daemon's state is written through changeover.state.State, as the daemon does."""

from __future__ import annotations

from pathlib import Path

import pytest

from changeover import config as config_mod
from changeover.config import Config
from changeover.errors import LintFailed, MigrationError
from changeover.migrations import commands
from changeover.state import State

from .conftest import Project, add


def deploy(cfg: Config, slot: str, version: str, path: str = "/srv/app") -> None:
    """What a deploy leaves in the state: the release in `slot`, live; the previous live one standby."""
    st = State(cfg.state_dir / "state.db")
    try:
        rel = st.add_release(version, path, ["true"], {})
        if hasattr(st, "transition_slot"):
            st.transition_slot(slot, "starting", release_id=rel.id)
        else:  # the state API before typed transitions
            st.set_slot(slot, "starting", rel.id)  # type: ignore[attr-defined]
        st.swap_live(slot)
    finally:
        st.close()


def shop(cfg: Config) -> None:
    add(cfg, "0001_carts", "CREATE TABLE carts (id bigint PRIMARY KEY);", "DROP TABLE carts;")
    add(cfg, "0002_note", "ALTER TABLE carts ADD COLUMN note text;", "ALTER TABLE carts DROP COLUMN note;")


def test_rollback_refuses_what_the_live_release_applied(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_carts", "CREATE TABLE carts (id bigint PRIMARY KEY);", "DROP TABLE carts;")
    commands.up(cfg, "v1")
    deploy(cfg, "blue", "v1")
    add(cfg, "0002_note", "ALTER TABLE carts ADD COLUMN note text;", "ALTER TABLE carts DROP COLUMN note;")
    deploy(cfg, "green", "v2")   # the deploy records the release, then migrates, then switches
    commands.safe(cfg, "v2")
    with pytest.raises(MigrationError, match=r"0002_note: release v2 \(live, slot green\) applied it .* "
                                             r"nothing was rolled back|nothing was rolled back.*0002_note: release v2"):
        commands.rollback(cfg)
    with pytest.raises(MigrationError, match=r"0001_carts: release v1 \(standby, slot blue\) applied it"):
        commands.rollback(cfg, to="0")
    assert [s.name for s in commands.rollback(cfg, force=True).rolled_back] == ["note"]
    # re-applied from the CLI without --release: it keeps v2's tag, so it stays protected
    commands.up(cfg)
    assert commands.status(cfg).migrations[1].release == "v2"
    with pytest.raises(MigrationError, match="release v2"):
        commands.rollback(cfg)


def test_a_migration_applied_before_a_release_was_deployed_is_needed_by_it(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    shop(cfg)
    commands.up(cfg)               # by hand, no release tag
    deploy(cfg, "blue", "v1")      # v1 was built against carts.note
    with pytest.raises(MigrationError, match=r"0002_note: release v1 \(live, slot blue\) was deployed after it "
                                             r"was applied"):
        commands.rollback(cfg)
    add(cfg, "0003_later", "ALTER TABLE carts ADD COLUMN later text;", "ALTER TABLE carts DROP COLUMN later;")
    commands.up(cfg)               # after v1's deploy, untagged: v1 does not use it
    assert [s.name for s in commands.rollback(cfg).rolled_back] == ["later"]


def test_a_rollback_in_progress_may_undo_the_release_it_leaves(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_carts", "CREATE TABLE carts (id bigint PRIMARY KEY);", "DROP TABLE carts;")
    commands.up(cfg, "v1")
    deploy(cfg, "blue", "v1")
    add(cfg, "0002_note", "ALTER TABLE carts ADD COLUMN note text;", "ALTER TABLE carts DROP COLUMN note;")
    deploy(cfg, "green", "v2")
    commands.safe(cfg, "v2")
    with pytest.raises(MigrationError):
        commands.rollback(cfg)
    assert [s.name for s in commands.rollback(cfg, leaving="v2").rolled_back] == ["note"]
    commands.up(cfg)
    st = State(cfg.state_dir / "state.db")   # the daemon's manual rollback, after switching back to v1
    st.begin_deployment("rollback", "v1", None, "v2", "blue")
    st.swap_live("blue")
    st.close()
    assert [s.name for s in commands.rollback(cfg).rolled_back] == ["note"]


# -- where migrations come from ------------------------------------------------------------------
def release_project(tmp_path: Path, database: str) -> Config:
    for v, extra in (("v1", ""), ("v2", "ALTER TABLE carts ADD COLUMN note text;\n")):
        d = tmp_path / "releases" / v / "migrations"
        d.mkdir(parents=True)
        (d / "0001_carts.up.sql").write_text("CREATE TABLE carts (id bigint PRIMARY KEY);\n")
        if extra:
            (d / "0002_note.up.sql").write_text(extra)
    path = tmp_path / "changeover.toml"
    path.write_text(f'[migrations]\ndatabase = "{database}"\ndir = "{{release}}/migrations"\n')
    return config_mod.load(path, environ={})


def test_migrations_come_with_the_release(tmp_path: Path, any_db: str) -> None:
    cfg = release_project(tmp_path, any_db)
    with pytest.raises(MigrationError, match=r'dir = "\{release\}/migrations" in .*changeover.toml reads migrations '
                                             r"from a release directory, and none was given: no release is live"):
        commands.status(cfg)
    res = commands.safe(cfg, "v1", release_dir=tmp_path / "releases" / "v1")
    assert [s.name for s in res.applied] == ["carts"]
    assert res.source == str(tmp_path / "releases" / "v1" / "migrations")
    deploy(cfg, "blue", "v1", str(tmp_path / "releases" / "v1"))
    st = commands.status(cfg)   # the CLI reads the live release's directory
    assert st.source.endswith("releases/v1/migrations") and "release v1 (live in blue)" in st.origin
    assert [s.name for s in commands.safe(cfg, "v2", release_dir=str(tmp_path / "releases" / "v2")).applied] == \
        ["note"]


def test_an_explicit_directory_that_does_not_exist_is_an_error(project: Project, tmp_path: Path) -> None:
    cfg = project("sqlite:///app.db", 'dir = "db/migratons"\n')
    with pytest.raises(MigrationError, match=r'db/migratons \(\[migrations\] dir = "db/migratons" in .*\) does not '
                                             "exist"):
        commands.enabled(cfg)
    default = project("sqlite:///app.db")
    (tmp_path / "migrations").rmdir()
    assert commands.enabled(default) is False          # the default directory may be absent
    assert commands.enabled(project("")) is False      # no database: no migrations


# -- the deploy's entry point ----------------------------------------------------------------------
def test_safe_for_a_deploy_refuses_unsafe_and_reports_contract(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY, old text);\nINSERT INTO a VALUES (1, 'x');")
    commands.up(cfg)
    add(cfg, "0002_add", "ALTER TABLE a ADD COLUMN new text;")
    add(cfg, "0003_idx", "CREATE INDEX a_new ON a (new);")
    with pytest.raises(LintFailed, match=r"0003_idx is unsafe \(.*0003_idx.up.sql:1:1 \[index-not-concurrent\].*"
                                         r"recipe: .*CONCURRENTLY"):
        commands.safe(cfg, "v2", refuse_unsafe=True)
    assert len(commands.status(cfg).pending) == 2   # nothing applied
    add(cfg, "0003_idx", "-- changeover:phase contract\nALTER TABLE a DROP COLUMN old;")
    res = commands.safe(cfg, "v2", refuse_unsafe=True)
    assert [s.name for s in res.applied] == ["add"] and res.contract_pending == ["0003_idx"]
    assert res.to_json()["contract_pending"] == ["0003_idx"]


def test_the_database_url_given_wins_over_the_config(project: Project, pg_url: str) -> None:
    cfg = project("postgresql://nobody@127.0.0.1:1/none")
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);")
    res = commands.safe(cfg, "v1", database_url=pg_url)
    assert [s.name for s in res.applied] == ["a"]
    assert commands.status(cfg, database_url=pg_url).migrations[0].state == "applied"
