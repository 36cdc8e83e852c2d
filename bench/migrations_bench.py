"""Migrations benchmark: adding and filling a column on a big table while a writer keeps writing.

    .venv/bin/python bench/migrations_bench.py [--rows 5000000] [--batch 1000] [--json out.json]
    .venv/bin/python bench/migrations_bench.py --lint DIR [DIR ...] [--rounds 5] [--json out.json]

`--lint` compares the linter with squawk (`pip install squawk-cli`) on directories of real projects'
migrations (docs/migrations.md says how to extract them) and measures lint speed side by side;
see bench/lint_compare.py. It needs no database.

A separate process inserts a row and updates a random row, back to back, on its own connection,
and records the latency of every write. Three ways to add a `uuid` column filled for every row:

  changeover   ADD COLUMN (nullable) + SET DEFAULT, then `-- changeover:backfill` batches
  naive-update ADD COLUMN (nullable), then one UPDATE of the whole table
  naive-alter  ADD COLUMN ... DEFAULT gen_random_uuid() (rewrites the table)

Reported: longest write stall (the slowest single write while the migration ran), p99, writes
done, and total migration time. Also lint throughput on the test corpus (statements/second).
Needs PostgreSQL at 127.0.0.1:5432 (trust auth, user postgres); creates and drops its database.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from changeover import config as config_mod  # noqa: E402
from changeover.migrations import commands  # noqa: E402

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
CORPUS = ROOT / "tests" / "migrations" / "corpus" / "shop"


def writer(url: str, rows: int, stop: Any, out: Any) -> None:
    """Insert + update a random row, back to back; send [(t_start, latency_s)] when told to stop."""
    import random

    lat: list[tuple[float, float]] = []
    with psycopg.connect(url, autocommit=True) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            c.execute("INSERT INTO events (account, amount) VALUES (%s, 1)", (random.randrange(1000),))
            t1 = time.monotonic()
            c.execute("UPDATE events SET amount = amount + 1 WHERE id = %s", (random.randrange(1, rows),))
            t2 = time.monotonic()
            lat.append((t0, t1 - t0))
            lat.append((t1, t2 - t1))
    out.put(lat)


def measure(url: str, rows: int, label: str, action: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=writer, args=(url, rows, stop, out))
    p.start()
    time.sleep(2.0)  # writer warmed up
    t0 = time.monotonic()
    action()
    total = time.monotonic() - t0
    t1 = time.monotonic()
    time.sleep(0.5)
    stop.set()
    lat = out.get()
    p.join()
    window = [(d, t - t0) for (t, d) in lat if t0 - 0.05 <= t <= t1]
    worst = sorted(window, reverse=True)[:5]
    during = sorted(d for d, _ in window)
    res = {"method": label, "total_s": round(total, 2), "longest_stall_ms": round(1000 * max(during), 1),
           "p99_ms": round(1000 * during[int(len(during) * 0.99)], 2),
           "median_ms": round(1000 * statistics.median(during), 3), "writes": len(during),
           "worst_ms_at_s": [(round(1000 * d, 1), round(at, 2)) for d, at in worst]}
    print(json.dumps(res), flush=True)
    return res


def lint_throughput(rounds: int = 200) -> dict[str, Any]:
    commands.lint(None, [str(CORPUS)])  # warm up
    t0 = time.perf_counter()
    n = 0
    for _ in range(rounds):
        n += commands.lint(None, [str(CORPUS)]).statements
    dt = time.perf_counter() - t0
    res = {"statements": n, "seconds": round(dt, 3), "statements_per_s": round(n / dt)}
    print(json.dumps({"lint": res}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--lint", type=Path, nargs="+", help="compare with squawk on these migration directories")
    ap.add_argument("--rounds", type=int, default=5, help="in-process lint rounds for --lint")
    args = ap.parse_args()
    if args.lint:
        import lint_compare
        lint_compare.main(args.lint, args.rounds, args.json)
        return
    results: dict[str, Any] = {"rows": args.rows, "batch": args.batch, "lint": lint_throughput()}

    name = f"co_bench_{secrets.token_hex(4)}"
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(ADMIN, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    try:
        t0 = time.monotonic()
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                      "account bigint NOT NULL, amount bigint NOT NULL, created_at timestamptz DEFAULT now())")
            c.execute("INSERT INTO events (account, amount) SELECT g %% 1000, g FROM generate_series(1, %s) g",
                      (args.rows,))
            c.execute("VACUUM ANALYZE events")
        print(f"loaded {args.rows} rows in {time.monotonic() - t0:.1f}s", flush=True)

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "migrations").mkdir()
            (root / "changeover.toml").write_text(
                f'[app]\ncommand = ["true"]\n[migrations]\ndatabase = "{url}"\n')
            (root / "migrations" / "0001_events_token.up.sql").write_text(
                "ALTER TABLE events ADD COLUMN token uuid;\n"
                "ALTER TABLE events ALTER COLUMN token SET DEFAULT gen_random_uuid();\n"
                f"-- changeover:backfill table=events batch={args.batch}\n"
                "UPDATE events SET token = gen_random_uuid() WHERE token IS NULL;\n")
            cfg = config_mod.load(root / "changeover.toml", environ={})
            runs = [measure(url, args.rows, "changeover", lambda: commands.up(cfg))]

        def naive_update() -> None:
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("ALTER TABLE events ADD COLUMN token2 uuid")
                c.execute("UPDATE events SET token2 = gen_random_uuid()")

        def naive_alter() -> None:
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("ALTER TABLE events ADD COLUMN token3 uuid DEFAULT gen_random_uuid()")

        runs.append(measure(url, args.rows, "naive-update", naive_update))
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("VACUUM events")  # the single UPDATE left a dead copy of every row
        runs.append(measure(url, args.rows, "naive-alter", naive_alter))
        results["runs"] = runs
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    print("| method | longest write stall | p99 write | writes during | total time |")
    print("|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['method']} | {r['longest_stall_ms']} ms | {r['p99_ms']} ms | {r['writes']} | {r['total_s']} s |")
    print(f"lint: {results['lint']['statements_per_s']} statements/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
