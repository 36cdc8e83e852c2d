"""`changeover init`: a changeover.toml, migrations/ and .env.example for the project in a directory.

What the project is decides the command, the build, the health path and the env:

    Procfile (web: ...)                      its web command (it says how the app runs)
    package.json                             its start script (or main), npm/yarn/pnpm install as the build
    pyproject.toml / requirements*.txt       gunicorn, uvicorn or Django (manage.py), a venv as the build
    go.mod                                   `go build` as the build, the binary as the command
    an executable (a Go binary, any ELF)     run as it is

Nothing that exists is overwritten: such a file is reported as kept. `init --example node` copies
the Node shop example (examples/node-shop) instead.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from changeover.errors import UsageError

EXAMPLES = {"node": "node-shop"}
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
_SHELL = re.compile(r"[|&;<>()`]|\$\(|&&|\|\|")
_DB_PACKAGES = ("pg", "postgres", "knex", "sequelize", "typeorm", "@prisma/client", "psycopg", "psycopg2",
                "psycopg2-binary", "asyncpg", "sqlalchemy", "django")
_REDIS_PACKAGES = ("redis", "ioredis", "connect-redis", "django-redis", "rq", "celery")


@dataclass
class Project:
    """What init found: filled into the templates below."""

    kind: str
    command: list[str]
    build: list[str] = field(default_factory=list)
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # said to the user, and written as comments


def detect(root: Path) -> Project:
    """The kind of project in root; UsageError when nothing is recognised."""
    found = _node(root) or _python(root) or _go(root)
    procfile = _procfile(root)
    if procfile is not None:
        if found is None:
            found = Project("Procfile", procfile)
        else:
            found.command = procfile
            found.kind += " + Procfile"
        found.notes.append("command is the Procfile's web process")
    if found is None:
        raise UsageError(f"{root}: no package.json, pyproject.toml, requirements.txt, Procfile, go.mod or executable "
                         "here to tell how the app runs; write changeover.toml by hand (docs/getting-started.md) or "
                         "try `changeover init --example node`")
    return found


def _argv(line: str) -> list[str]:
    """A start command as argv: split when it is a plain command, else run by sh."""
    if _SHELL.search(line):
        return ["sh", "-c", line]
    return shlex.split(line)


def _procfile(root: Path) -> list[str] | None:
    path = root / "Procfile"
    if not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        name, sep, cmd = line.partition(":")
        if sep and name.strip() == "web" and cmd.strip():
            return _argv(cmd.strip())
    return None


def _node(root: Path) -> Project | None:
    path = root / "package.json"
    if not path.is_file():
        return None
    try:
        pkg = json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(pkg, dict):
        raise UsageError(f"{path}: expected a JSON object")
    scripts: dict[str, object] = pkg["scripts"] if isinstance(pkg.get("scripts"), dict) else {}
    start = scripts.get("start")
    start = start if isinstance(start, str) else None
    p = Project("Node.js", [])
    if start:
        p.command = _argv(start)
        p.notes.append(f"command from package.json scripts.start ({start!r})")
    else:
        main = pkg.get("main") if isinstance(pkg.get("main"), str) else None
        entry = main or next((n for n in ("server.js", "index.js", "app.js") if (root / n).is_file()), "server.js")
        p.command = ["node", entry]
        p.notes.append(f"no start script: command runs {entry}")
    if (root / "pnpm-lock.yaml").is_file():
        p.build = ["pnpm", "install", "--frozen-lockfile", "--prod"]
    elif (root / "yarn.lock").is_file():
        p.build = ["yarn", "install", "--frozen-lockfile", "--production"]
    elif (root / "package-lock.json").is_file():
        p.build = ["npm", "ci", "--omit=dev", "--no-audit", "--no-fund"]
    else:
        p.build = ["npm", "install", "--omit=dev", "--no-audit", "--no-fund"]
        p.notes.append("no lockfile: the build is `npm install` (commit package-lock.json and use `npm ci`)")
    deps = {**(pkg.get("dependencies") or {}), **(pkg.get("devDependencies") or {})}
    p.env["NODE_ENV"] = "production"
    _service_env(p, set(deps))
    if "express-session" in deps:
        p.env["SESSION_SECRET"] = "${SESSION_SECRET}"
    return p


def _python_requirements(root: Path) -> set[str]:
    names: set[str] = set()
    for req in sorted(root.glob("requirements*.txt")):
        for line in req.read_text(errors="replace").splitlines():
            m = re.match(r"\s*([A-Za-z0-9_.-]+)", line)
            if m and not line.lstrip().startswith(("#", "-")):
                names.add(m.group(1).lower())
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{pyproject}: invalid TOML ({e})") from None
        proj = data.get("project") or {}
        deps = list(proj.get("dependencies") or [])
        poetry = ((data.get("tool") or {}).get("poetry") or {}).get("dependencies") or {}
        deps += list(poetry)
        for d in deps:
            m = re.match(r"\s*([A-Za-z0-9_.-]+)", str(d))
            if m:
                names.add(m.group(1).lower())
    return names


def _python(root: Path) -> Project | None:
    has_req = any(root.glob("requirements*.txt"))
    if not (has_req or (root / "pyproject.toml").is_file() or (root / "manage.py").is_file()):
        return None
    deps = _python_requirements(root)
    venv = ".venv/bin/"
    p = Project("Python", [])
    if (root / "requirements.txt").is_file():
        p.build = ["sh", "-c", "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"]
    else:
        p.build = ["sh", "-c", "python3 -m venv .venv && .venv/bin/pip install ."]
    django = "django" in deps or (root / "manage.py").is_file()
    if django:
        wsgi = next(iter(sorted(root.glob("*/wsgi.py"))), None)
        module = wsgi.parent.name if wsgi is not None else "project"
        p.kind = "Django"
        p.env["DJANGO_SETTINGS_MODULE"] = f"{module}.settings"
        if "gunicorn" in deps:
            p.command = [venv + "gunicorn", f"{module}.wsgi", "--bind", "127.0.0.1:$PORT"]
        else:
            p.command = [venv + "python", "manage.py", "runserver", "127.0.0.1:$PORT", "--noreload"]
            p.notes.append("Django without gunicorn: runserver is a development server; add gunicorn")
    elif "gunicorn" in deps:
        p.kind = "Python (gunicorn)"
        p.command = [venv + "gunicorn", f"{_module(root)}:app", "--bind", "127.0.0.1:$PORT"]
    elif "uvicorn" in deps:
        p.kind = "Python (uvicorn)"
        p.command = [venv + "uvicorn", f"{_module(root)}:app", "--host", "127.0.0.1", "--port", "$PORT"]
    else:
        p.command = [venv + "python", f"{_module(root)}.py"]
        p.notes.append("no gunicorn, uvicorn or Django found: command runs the module; it must listen on $PORT")
    _service_env(p, deps)
    return p


def _module(root: Path) -> str:
    return next((n for n in ("app", "main", "wsgi", "asgi", "server") if (root / f"{n}.py").is_file()), "app")


def _go(root: Path) -> Project | None:
    if (root / "go.mod").is_file():
        return Project("Go", ["./app"], build=["go", "build", "-o", "app", "."])
    for f in sorted(root.iterdir()):
        if f.is_file() and f.stat().st_mode & 0o111 and f.read_bytes()[:4] == b"\x7fELF":
            return Project("binary", [f"./{f.name}"], notes=[f"command runs the executable {f.name}"])
    return None


def _service_env(p: Project, deps: set[str]) -> None:
    if deps & set(_DB_PACKAGES):
        p.env["DATABASE_URL"] = "${DATABASE_URL}"
    if deps & set(_REDIS_PACKAGES):
        p.env["REDIS_URL"] = "${REDIS_URL}"


# -- the files ------------------------------------------------------------------------------------
def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def render_config(p: Project) -> str:
    env = "\n".join(f"{k} = {json.dumps(v)}" for k, v in p.env.items())
    notes = "".join(f"# {n}\n" for n in p.notes)
    build = (f"build = {_toml_list(p.build)}   # run in the release directory before it starts\n" if p.build
             else "# build = [...]   # run in the release directory before it starts\n")
    return f"""# changeover.toml, written by `changeover init` for a {p.kind} project.
# Every key: docs/config-reference.md. Secrets belong in .env (see .env.example), not here.
{notes}
[app]
command = {_toml_list(p.command)}   # argv, run in the release directory; PORT is set (and $PORT substituted)
health_path = "{p.health_path}"     # ready = 2xx three times in a row
instances = 2
ready_timeout = "30s"
stop_timeout = "10s"
{build}build_timeout = "10m"

[env]                                # what the app gets, recorded with each release
{env}

[proxy]
listen = "${{LISTEN:-127.0.0.1:8080}}"

[releases]                           # `changeover deploy VERSION --git REF` exports REF here
dir = "releases"
keep = 5

[migrations]
dir = "{{release}}/migrations"        # plain SQL, read from the release being deployed

[[checks.smoke]]
name = "health"
path = "{p.health_path}"

[monitor]
observe = "2m"
"""


def render_env_example(p: Project) -> str:
    lines = ["# Copy to .env (beside changeover.toml) and fill in; the real environment wins over this file."]
    values = {"DATABASE_URL": "postgresql://app:secret@127.0.0.1:5432/app", "REDIS_URL": "redis://127.0.0.1:6379/0",
              "SESSION_SECRET": "change-me"}
    for k, v in p.env.items():
        if v == f"${{{k}}}":
            lines.append(f"{k}={values.get(k, '')}")
    lines.append("LISTEN=127.0.0.1:8080")
    return "\n".join(lines) + "\n"


@dataclass
class Result:
    project: str
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    next: list[str] = field(default_factory=list)


def _put(root: Path, name: str, text: str, res: Result) -> None:
    path = root / name
    if path.exists():
        res.kept.append(name)
        return
    path.write_text(text)
    res.written.append(name)


def next_commands(root: Path) -> list[str]:
    in_git = any((d / ".git").exists() for d in (root, *root.parents))
    deploy = "changeover deploy v1 --git HEAD" if in_git else "changeover deploy v1 --path ."
    return ["cp .env.example .env   # then fill it in", "changeover serve &", deploy]


def init(root: Path) -> Result:
    """Scaffold changeover.toml, migrations/ and .env.example in root; never overwrite."""
    p = detect(root)
    res = Result(project=p.kind, notes=list(p.notes))
    _put(root, "changeover.toml", render_config(p), res)
    if (root / "migrations").exists():
        res.kept.append("migrations/")
    else:
        (root / "migrations").mkdir()
        (root / "migrations" / ".gitkeep").write_text("")
        res.written.append("migrations/")
    _put(root, ".env.example", render_env_example(p), res)
    res.next = next_commands(root)
    return res


def copy_example(name: str, root: Path) -> Result:
    """Copy examples/<name> into root, file by file, keeping every file that exists."""
    if name not in EXAMPLES:
        raise UsageError(f"--example {name}: expected one of {', '.join(EXAMPLES)}")
    src = EXAMPLES_DIR / EXAMPLES[name]
    if not src.is_dir():
        raise UsageError(f"the example {EXAMPLES[name]} is not installed with this changeover ({src}); it is in "
                         "the repository's examples/ directory")
    res = Result(project=f"example {EXAMPLES[name]}")
    skip = {"node_modules", "releases", ".changeover", ".cache", ".env"}
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if rel.parts[0] in skip or f.is_dir():
            continue
        dest = root / rel
        if dest.exists():
            res.kept.append(str(rel))
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
        res.written.append(str(rel))
    res.next = ["cp .env.example .env   # then fill it in", "changeover serve &",
                "git init -q && git add -A && git commit -qm v1 && changeover deploy v1 --git HEAD"]
    return res
