"""changeover's linter next to squawk (PyPI `squawk-cli`) on real projects' migrations.

Imported by migrations_bench.py (`--lint DIR...`); never by the tests. For every file, the findings
of both tools are put on the statement they concern; a concern both raise on the same statement is
agreement, any other is a disagreement, listed with the statement for review.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from changeover.migrations import commands, formats, sqltext  # noqa: E402

# squawk rule -> the changeover rules that raise the same concern
SAME = {
    "require-concurrent-index-creation": {"index-not-concurrent"},
    "require-concurrent-index-deletion": {"drop-index-not-concurrent"},
    "require-concurrent-reindex": {"reindex-not-concurrent"},
    "ban-concurrent-index-creation-in-transaction": {"concurrently-in-transaction"},
    "changing-column-type": {"changing-column-type"},
    # squawk also reports UNIQUE / PRIMARY KEY under this rule (advice PostgreSQL refuses: they cannot be NOT VALID)
    "constraint-missing-not-valid": {"constraint-missing-not-valid", "slow-under-held-lock", "unique-without-index"},
    "adding-foreign-key-constraint": {"constraint-missing-not-valid"},
    "disallowed-unique-constraint": {"unique-without-index"},
    "adding-primary-key-constraint": {"unique-without-index"},
    "adding-not-nullable-field": {"setting-not-null"},
    "adding-required-field": {"adding-required-column"},
    "adding-field-with-default": {"adding-volatile-default", "adding-stored-generated-column",
                                  "adding-serial-column"},
    "adding-serial-primary-key-field": {"adding-serial-column", "unique-without-index"},
    "renaming-column": {"renaming-column"}, "renaming-table": {"renaming-table"},
    "renaming-object": {"renaming-object", "renaming-table"},
    "ban-drop-column": {"dropping-column"}, "ban-drop-table": {"dropping-table"},
    "ban-drop-view": {"dropping-object"}, "ban-drop-function": {"dropping-object"},
    "ban-drop-type": {"dropping-object"}, "ban-drop-schema": {"dropping-object"},
    "ban-drop-database": {"dropping-object"}, "ban-drop-constraint": {"dropping-constraint"},
    "ban-drop-default": {"dropping-default"}, "ban-truncate-cascade": {"truncating-table"},
    "prefer-bigint-over-int": {"prefer-bigint"}, "prefer-bigint-over-smallint": {"prefer-bigint"},
    "prefer-big-int": {"prefer-bigint"}, "prefer-identity": {"prefer-identity"},
    "prefer-text-field": {"prefer-text"}, "prefer-timestamp-tz": {"prefer-timestamptz"},
    "ban-char-field": {"prefer-text-over-char"}, "identifier-too-long": {"identifier-too-long"},
}
# squawk rules about how a migration is run, which changeover's runner does itself (see docs)
RUNNER = {"require-lock-timeout", "require-statement-timeout", "prefer-robust-stmts", "transaction-nesting"}


def _sql_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*.sql") if p.is_file())


def _up_files(d: Path) -> list[Path]:
    return [m.up.path for m in formats.discover(d)]


def squawk_bin() -> str:
    exe = shutil.which("squawk") or str(Path(sys.executable).parent / "squawk")
    if not Path(exe).exists():
        raise SystemExit("squawk not found: pip install squawk-cli")
    return exe


def run_squawk(files: list[Path]) -> list[dict[str, Any]]:
    out = subprocess.run([squawk_bin(), "--reporter", "json", "--assume-in-transaction", "--pg-version", "15",
                          *map(str, files)], capture_output=True, text=True)
    return list(json.loads(out.stdout or "[]"))


def _statement_of(starts: list[int], line: int) -> int:
    """1-based statement index holding 1-based `line`."""
    idx = 0
    for i, s in enumerate(starts, 1):
        if s <= line:
            idx = i
    return max(idx, 1)


def compare(d: Path) -> dict[str, Any]:
    ups = _up_files(d)
    res = commands.lint(None, [str(d)])
    ours: dict[tuple[str, int], set[str]] = {}
    for f in res.findings:  # a notice in the expand phase is a statement judged harmless (e.g. one row by key)
        if f.message.startswith("rollback:") or f.ignored or (f.severity == "notice" and f.phase == "expand"):
            continue
        ours.setdefault((str(Path(f.file).resolve()), f.statement), set()).add(f.rule)
    theirs: dict[tuple[str, int], set[str]] = {}
    texts: dict[tuple[str, int], str] = {}
    for p in ups:
        try:
            sts = sqltext.split(p.read_text(), sqltext.POSTGRES)
        except sqltext.SplitError:
            continue
        for i, st in enumerate(sts, 1):
            texts[(str(p.resolve()), i)] = " ".join(st.text.split())[:160]
        starts = [st.line for st in sts]
        for sq in run_squawk_cached(p):
            key = (str(p.resolve()), _statement_of(starts, int(sq["line"]) + 1))
            theirs.setdefault(key, set()).add(str(sq["rule_name"]))
    agree, squawk_only, ours_only = Counter[str](), Counter[str](), Counter[str]()
    examples: dict[str, list[str]] = {}
    for key in sorted(set(ours) | set(theirs)):
        o, t = ours.get(key, set()), theirs.get(key, set())
        where = f"{Path(key[0]).relative_to(d)}#{key[1]}: {texts.get(key, '')}"
        for r in t:
            if r in RUNNER:
                squawk_only[r] += 1
                continue
            if SAME.get(r, set()) & o:
                agree[r] += 1
            else:
                label = f"squawk {r}" + (f" / changeover {','.join(sorted(o))}" if o else "")
                squawk_only[r] += 1
                examples.setdefault(label, []).append(where)
        mapped = set().union(*(SAME.get(r, set()) for r in t)) if t else set()
        for r in o - mapped:
            ours_only[r] += 1
            label = f"changeover {r}" + (f" / squawk {','.join(sorted(t))}" if t else "")
            examples.setdefault(label, []).append(where)
    return {"dir": str(d), "files": len(ups), "statements": len(texts),
            "changeover": dict(Counter(r for rs in ours.values() for r in rs)),
            "squawk": dict(Counter(r for rs in theirs.values() for r in rs)),
            "agree": dict(agree), "squawk_only": dict(squawk_only), "changeover_only": dict(ours_only),
            "examples": examples}


_CACHE: dict[str, list[dict[str, Any]]] = {}


def run_squawk_cached(p: Path) -> list[dict[str, Any]]:
    return _CACHE.get(str(p.resolve()), [])


def prime(dirs: list[Path]) -> None:
    """One squawk run over every up file (its paths come back as given)."""
    files = [p.resolve() for d in dirs for p in _up_files(d)]
    for f in run_squawk(files):
        _CACHE.setdefault(str(Path(f["file"]).resolve()), []).append(f)


def speed(dirs: list[Path], rounds: int) -> dict[str, Any]:
    files = [p for d in dirs for p in _sql_files(d)]
    commands.lint(None, [str(d) for d in dirs])  # warm up
    t0 = time.perf_counter()
    statements = 0
    for _ in range(rounds):
        statements += commands.lint(None, [str(d) for d in dirs]).statements
    inproc = time.perf_counter() - t0
    cli = [str(Path(sys.executable).parent / "changeover"), "migrate", "lint", "--json", "-c", "/nonexistent.toml",
           *map(str, dirs)]
    sq = [squawk_bin(), "--reporter", "json", "--assume-in-transaction", *map(str, files)]
    times: dict[str, list[float]] = {"cli": [], "squawk": []}
    for _ in range(3):
        for name, cmd in (("cli", cli), ("squawk", sq)):
            t = time.perf_counter()
            subprocess.run(cmd, capture_output=True)
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    n = len(files)
    return {"files": n, "statements_per_round": statements // rounds, "rounds": rounds,
            "in_process_files_per_s": round(n * rounds / inproc),
            "in_process_statements_per_s": round(statements / inproc),
            "cli_s": round(best["cli"], 3), "cli_files_per_s": round(n / best["cli"]),
            "squawk_s": round(best["squawk"], 3), "squawk_files_per_s": round(n / best["squawk"])}


def main(dirs: list[Path], rounds: int, out: Path | None) -> None:
    prime(dirs)
    compared = [compare(d) for d in dirs]
    results: dict[str, Any] = {"compare": compared, "speed": speed(dirs, rounds)}
    for c in compared:
        print(f"== {c['dir']}: {c['files']} files, {c['statements']} statements")
        for side in ("agree", "squawk_only", "changeover_only"):
            print(f"  {side}: {sum(c[side].values())} {dict(sorted(c[side].items(), key=lambda kv: -kv[1]))}")
    print(json.dumps(results["speed"]))
    if out:
        out.write_text(json.dumps(results, indent=2))
