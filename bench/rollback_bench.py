"""Automatic rollback benchmark: reaction time from fault onset to users on the old release again.

    .venv/bin/python bench/rollback_bench.py [--runs 10] [--kinds errors100,db] [--json out.json]

A real project on disk, a real `changeover serve` daemon, the example app (examples/app/server.py)
and a steady keep-alive load through the proxy. v1 is deployed; then, per fault kind and run, a new
release is deployed with `--wait`, its fault is switched on 0.5 s after it answers through the proxy
(FAULT_FILE, aimed at that release with "only_version"), and we time:

- onset -> the first request answered by v1 through the proxy (what users see);
- onset -> the rollback recorded in `changeover history` (its finished_at, wall clock);

plus the trigger reason and the switch-back step's time. The crash loop runs on a second project
whose daemon sends no synthetic requests (synthetic_rate = 0) and gets no traffic after onset, so
only the crash-loop trigger can see it; it is timed from history.

Workaround for a product bug: the daemon's mirror of the proxy's counters is pulled every 100 ms,
but the observer starts ~15 ms after a new release is started in a slot, so it can still read the
slot's previous occupant's run of consecutive failures and roll the new release back at once.
After a run that ended on `consecutive_failures` the bench therefore deploys a healthy release
("flush-NN") into that slot first, and counts how often it was rolled back on stale evidence.

Monitor settings are the defaults except observe = "60s" and metrics_listen = "".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from changeover.daemon.procs import free_port  # noqa: E402
from changeover.loadgen import RW, get  # noqa: E402

T = TypeVar("T")
EXAMPLE = ROOT / "examples" / "app" / "server.py"
PAUSE_BEFORE_FAULT = 0.5
TARGET = 2.0  # s, fault onset -> old version answering, for a release failing every request

# name, fault (FAULT_FILE JSON), what it is
TRAFFIC_KINDS: list[tuple[str, dict[str, Any], str]] = [
    ("errors100", {"error_rate": 1.0}, "100 % errors"),
    ("errors10", {"error_rate": 0.10}, "10 % errors"),
    ("latency200", {"latency_ms": 200}, "+200 ms latency"),
    ("db", {"db": "down"}, 'database down (health reports `"db": "down"`)'),
    ("route_errors3", {"routes": {"/cart": {"error_rate": 1.0}}}, "100 % errors on `GET /cart` (3 % of requests)"),
    ("route_latency5", {"routes": {"/me": {"latency_ms": 200}}}, "+200 ms on `GET /me` (5 % of requests)"),
]
# Healthy deploys (identical code): any rollback is a false one. Run on a project of their own.
HEALTHY_KINDS: list[tuple[str, dict[str, Any], str]] = [
    ("ramp10", {}, "identical code, traffic ramping 10x during the window"),
    ("background1", {"error_rate": 0.01}, "identical code, 1 % background errors on every route"),
]
# What the load asks for: most requests on /, a few on other routes (the route faults' targets).
PATHS = {"/": 80.0, "/items": 12.0, "/me": 5.0, "/cart": 3.0}
QUIET_PAUSE, BUSY_PAUSE = 0.1, 0.01   # per connection between requests: ~70 vs ~700 req/s
RAMP_OVER = 10.0                      # s from the new release going live to the full ramp
CRASH_KIND: tuple[str, dict[str, Any], str] = ("crash", {"exit": True}, "crash loop (exits within 0.1 s)")
ALL_KINDS = [k[0] for k in TRAFFIC_KINDS] + [CRASH_KIND[0]] + [k[0] for k in HEALTHY_KINDS]
# A route fault: the example app applies faults to every route, so each release runs it through a
# small wrapper that applies {"routes": {path: {"error_rate": x, "latency_ms": n}}} to one path.
ROUTE_SHIM = """import random, time
from urllib.parse import urlparse

import server

_dispatch = server.Handler.dispatch


def dispatch(self):
    f = (server.faults().get("routes") or {}).get(urlparse(self.path).path) or {}
    if f.get("latency_ms"):
        time.sleep(float(f["latency_ms"]) / 1000)
    if random.random() < float(f.get("error_rate", 0)):
        return self.send(500, {"error": "injected route fault"})
    return _dispatch(self)


server.Handler.dispatch = dispatch
server.main()
"""



@dataclass
class Project:
    """A project directory with its changeover.toml, and the daemon serving it."""

    root: Path
    synthetic_rate: float | None = None  # None: the default
    observe: str = "60s"
    port: int = field(default_factory=free_port)
    daemon: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.root / "changeover.toml"

    @property
    def fault(self) -> Path:
        return self.root / "fault.json"

    def write(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.fault.write_text("{}")
        db = self.root / "app.db"
        sqlite3.connect(db).close()
        synthetic = "" if self.synthetic_rate is None else f"synthetic_rate = {self.synthetic_rate:g}\n"
        self.config.write_text(f"""
[app]
command = [{json.dumps(sys.executable)}, "bench_app.py", "$PORT"]
health_path = "/health"

[proxy]
listen = "127.0.0.1:{self.port}"

[env]
FAULT_FILE = "{self.fault}"
DATABASE_URL = "sqlite:///{db}"

[monitor]
observe = "{self.observe}"
metrics_listen = ""
{synthetic}""")

    def cli(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "changeover", *args, "-c", str(self.config)], cwd=self.root,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"changeover {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    async def acli(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """cli() for the event loop; the CLI process is killed if the caller is cancelled."""
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "changeover", *args, "-c", str(self.config),
                                                    cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(proc.wait(), 5)
            raise
        p = subprocess.CompletedProcess(list(args), proc.returncode or 0, out.decode(), err.decode())
        if check and p.returncode != 0:
            raise RuntimeError(f"changeover {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def release(self, version: str) -> str:
        d = self.root / "releases" / version
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLE, d / "server.py")
        (d / "bench_app.py").write_text(ROUTE_SHIM)
        return str(d)

    async def deploy(self, version: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return await self.acli("deploy", version, "--path", self.release(version), *extra, check=check)

    async def history(self, limit: int = 5) -> list[dict[str, Any]]:
        return list(json.loads((await self.acli("history", "--json", "--limit", str(limit))).stdout))

    def start(self) -> None:
        with open(self.root / "serve.out", "ab") as log:
            self.daemon = subprocess.Popen([sys.executable, "-m", "changeover", "serve", "-c", str(self.config)],
                                           cwd=self.root, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60  # a busy 2-core machine can take a while
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError("daemon exited:\n" + (self.root / "serve.out").read_text()[-3000:])
            if (self.root / ".changeover" / "control.sock").exists() and \
                    self.cli("status", "--json", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("daemon did not come up:\n" + (self.root / "serve.out").read_text()[-3000:])

    def stop(self) -> None:
        """`changeover down`, then kill whatever this project started that is still running."""
        if self.daemon is not None and self.daemon.poll() is None:
            with contextlib.suppress(Exception):
                if self.cli("down", check=False, timeout=60).returncode != 0:
                    # Busy with a deploy (we were interrupted): end its observation window, retry.
                    self.cli("rollback", "--reason", "bench stopping", check=False, timeout=60)
                    self.cli("down", check=False, timeout=60)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.wait(timeout=20)
            if self.daemon.poll() is None:
                self.daemon.kill()
                self.daemon.wait(timeout=10)
        for pid in pids_under(self.root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def pids_under(root: Path) -> list[int]:
    """Processes running in, or naming, the bench's own temporary directory."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(d / "cwd")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if cwd.startswith(str(root)) or str(root).encode() in cmd:
            out.append(int(d.name))
    return out


class Traffic:
    """Keep-alive GETs on N connections (changeover.loadgen.get), paths drawn from PATHS; notes
    which release answered when. `pause` may be changed while it runs (a ramp)."""

    def __init__(self, port: int, connections: int = 8, pause: float = BUSY_PAUSE) -> None:
        self.port, self.connections, self.pause = port, connections, pause
        self.rng = random.Random(14)
        self.answered: Counter[str] = Counter()   # by X-Version ("proxy" when the proxy answered itself)
        self.failed: Counter[str] = Counter()     # 5xx by X-Version
        self.conn_errors: Counter[str] = Counter()
        self.last: dict[str, float] = {}          # version -> monotonic time of its latest answer
        self.log: list[tuple[float, str]] = []    # (monotonic time, X-Version) of every answer
        self._waits: list[tuple[str, float, asyncio.Future[float]]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.started = self.stopped = 0.0
        self.steady_rps = 0.0  # v1 alone, before the first deploy

    def start(self) -> None:
        self.started = time.monotonic()
        self._tasks = [asyncio.create_task(self._conn()) for _ in range(self.connections)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self.stopped = time.monotonic()

    def first_answer(self, version: str, after: float) -> asyncio.Future[float]:
        """Resolves with the time of the first answer by `version` received at or after `after`."""
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waits.append((version, after, fut))
        return fut

    def _note(self, version: str, t: float) -> None:
        self.last[version] = t
        self.log.append((t, version))
        for v, after, fut in self._waits:
            if v == version and t >= after and not fut.done():
                fut.set_result(t)
        self._waits = [w for w in self._waits if not w[2].done()]

    async def _conn(self) -> None:
        conn: RW | None = None
        while not self._stop.is_set():
            try:
                path = self.rng.choices(list(PATHS), list(PATHS.values()))[0]
                status, headers, _, conn = await get("127.0.0.1", self.port, path, conn, timeout=10)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError) as e:
                self.conn_errors[type(e).__name__] += 1
                conn = None
                await asyncio.sleep(0.01)
                continue
            version = headers.get("x-version", "proxy")
            self.answered[version] += 1
            if status >= 500:
                self.failed[version] += 1
            self._note(version, time.monotonic())
            if self.pause:
                await asyncio.sleep(self.pause)
        if conn is not None:
            conn[1].close()


@dataclass
class Run:
    kind: str
    version: str
    rolled_back: bool
    reason: str = ""
    users_back: float | None = None     # s, onset -> first answer by the old version through the proxy
    history_back: float | None = None   # s, onset -> history's finished_at of the rolled-back deploy
    switch_back_ms: float | None = None  # the "roll back to <slot>" step's switch time
    rps: float | None = None            # load through the proxy in the 0.5 s before onset
    late_answers: int = 0               # answers by the failed release after the old one answered again
    late_for: float = 0.0               # s, from then to the failed release's last answer
    note: str = ""
    route: str = ""                     # the route a route trigger named
    rps_end: float | None = None        # healthy runs: load at the end of the window


async def rollback_record(p: Project, version: str, onset_wall: float) -> dict[str, Any]:
    """Reason, history-based reaction time and switch-back time of the deploy of `version`."""
    dep = next(d for d in await p.history() if d["version"] == version and d["kind"] == "deploy")
    out: dict[str, Any] = {"state": dep["state"], "reason": (dep.get("reason") or "").split(":", 1)[0]}
    for check in dep.get("checks", []):
        if check["name"] == "rollback trigger":
            out["evidence"] = check.get("data") or {}
    if "route" in out.get("evidence", {}):
        out["route"] = out["evidence"]["route"]
    if dep["state"] == "rolled_back" and dep.get("finished_at"):
        out["history_back"] = dep["finished_at"] - onset_wall
    for step in dep.get("steps", []):
        if step["name"].startswith("roll back to") and step.get("detail"):
            with contextlib.suppress(ValueError):
                out["switch_back_ms"] = float(step["detail"].split()[0])
    return out


async def traffic_run(p: Project, traffic: Traffic, kind: str, spec: dict[str, Any], version: str,
                      old: str) -> Run:
    deploying = asyncio.create_task(p.deploy(version, "--wait", check=False))
    live = traffic.first_answer(version, 0.0)
    either: list[asyncio.Future[Any]] = [live, deploying]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not live.done():
        live.cancel()
        r = await deploying
        raise RuntimeError(f"{version} never answered through the proxy:\n{r.stdout}\n{r.stderr}")
    await asyncio.sleep(PAUSE_BEFORE_FAULT)
    note = ""
    if traffic.last.get(old, 0.0) > live.result() + 0.1:
        note = f"{old} still answered after {version} went live"
    p.fault.write_text(json.dumps({**spec, "only_version": version}))
    onset, onset_wall = time.monotonic(), time.time()
    back = traffic.first_answer(old, onset)
    either = [back, deploying]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    result = await deploying
    with contextlib.suppress(TimeoutError):  # rolled back: the next answer by the old version is near
        await asyncio.wait_for(asyncio.shield(back), 5 if result.returncode else 0.01)
    p.fault.write_text("{}")
    rec = await rollback_record(p, version, onset_wall)
    if not back.done():
        back.cancel()
    run = Run(kind, version, rec["state"] == "rolled_back", rec["reason"], None, rec.get("history_back"),
              rec.get("switch_back_ms"), note=note, route=rec.get("route", ""))
    run.rps = sum(1 for t, _ in traffic.log if onset - PAUSE_BEFORE_FAULT <= t < onset) / PAUSE_BEFORE_FAULT
    if back.done() and not back.cancelled():
        run.users_back = back.result() - onset
        await asyncio.sleep(1)  # does the failed release still answer anyone after that?
        late = [t for t, v in traffic.log if v == version and t > back.result()]
        run.late_answers, run.late_for = len(late), max(late, default=back.result()) - back.result()
    return run


async def crash_run(p: Project, spec: dict[str, Any], version: str) -> Run:
    deploying = asyncio.create_task(p.deploy(version, "--wait", check=False))
    conn: RW | None = None
    while True:  # one request at a time until the new release answers; nothing after onset
        if deploying.done():
            r = await deploying
            raise RuntimeError(f"{version} never answered through the proxy:\n{r.stdout}\n{r.stderr}")
        try:
            _, h, _, conn = await get("127.0.0.1", p.port, "/health", conn, timeout=2)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            h, conn = {}, None
        if h.get("x-version") == version:
            break
        await asyncio.sleep(0.05)
    if conn is not None:
        conn[1].close()
    await asyncio.sleep(PAUSE_BEFORE_FAULT)
    p.fault.write_text(json.dumps({**spec, "only_version": version}))
    onset_wall = time.time()
    await deploying
    p.fault.write_text("{}")
    rec = await rollback_record(p, version, onset_wall)
    return Run(CRASH_KIND[0], version, rec["state"] == "rolled_back", rec["reason"], None,
               rec.get("history_back"), rec.get("switch_back_ms"))


async def flush_stale_run(p: Project, traffic: Traffic, version: str, old: str) -> str | None:
    """Deploy a healthy release into the slot the last run failed in (see the module docstring).
    Returns the version whose evidence rolled it back, or None when it went live as it should."""
    await p.deploy(version, check=False)  # returns once live, or once rolled back
    await asyncio.sleep(0.3)
    rec = await rollback_record(p, version, time.time())
    if rec["state"] == "rolled_back":
        return str(rec.get("evidence", {}).get("version", "?"))
    t = time.monotonic()  # live and observing: end its window by hand, back to the old version
    await p.acli("rollback", "--reason", "bench: flush done")
    await asyncio.wait_for(traffic.first_answer(old, t), 10)
    return None


async def healthy_run(p: Project, traffic: Traffic, kind: str, spec: dict[str, Any], version: str) -> Run:
    """Deploy identical code and watch the whole window; any rollback is a false one. ramp10:
    quiet traffic before the switch, then 10x over RAMP_OVER seconds while it is observed."""
    traffic.pause = QUIET_PAUSE
    await asyncio.sleep(5)  # a quiet moment to deploy in
    if spec:
        p.fault.write_text(json.dumps({**spec, "only_version": version}))
    deploying = asyncio.create_task(p.deploy(version, "--wait", check=False))
    live = traffic.first_answer(version, 0.0)
    either: list[asyncio.Future[Any]] = [live, deploying]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not live.done():
        live.cancel()
        r = await deploying
        raise RuntimeError(f"{version} never answered through the proxy:\n{r.stdout}\n{r.stderr}")
    t0 = time.monotonic()
    while not deploying.done():
        if kind == "ramp10":
            k = min(1.0, (time.monotonic() - t0) / RAMP_OVER)
            traffic.pause = QUIET_PAUSE + (BUSY_PAUSE - QUIET_PAUSE) * k
        await asyncio.sleep(0.1)
    end = time.monotonic()
    await deploying
    p.fault.write_text("{}")
    traffic.pause = QUIET_PAUSE
    rec = await rollback_record(p, version, time.time())
    run = Run(kind, version, rec["state"] == "rolled_back", rec["reason"], route=rec.get("route", ""))
    run.rps = sum(1 for t, _ in traffic.log if t0 <= t < t0 + 2) / 2
    run.rps_end = sum(1 for t, _ in traffic.log if end - 3 <= t < end - 1) / 2
    if run.rolled_back:
        run.note = f"FALSE ROLLBACK: {rec.get('evidence', {})}"[:300]
    return run


async def healthy_phase(p: Project, kinds: list[tuple[str, dict[str, Any], str]], runs: dict[str, int],
                        out: list[Run]) -> None:
    traffic = Traffic(p.port, pause=QUIET_PAUSE)
    traffic.start()
    try:
        for kind, spec, _ in kinds:
            print(f"{kind} (healthy, {runs[kind]} deploys):", flush=True)
            for i in range(1, runs[kind] + 1):
                run = await healthy_run(p, traffic, kind, spec, f"{kind}-{i:02d}")
                print(f"  {run.version:<16} {run.rps or 0:.0f} -> {run.rps_end or 0:.0f} req/s "
                      f"rolled_back={run.rolled_back} {run.reason} {run.route} {run.note}", flush=True)
                out.append(run)
    finally:
        await traffic.stop()


def show(run: Run) -> None:
    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}s"

    rps = "" if run.rps is None else f"{run.rps:.0f} req/s "
    print(f"  {run.version:<14} {rps}rolled_back={run.rolled_back!s:<5} reason={run.reason or '-':<22} "
          f"users_back={s(run.users_back):<8} history={s(run.history_back):<8} "
          f"switch={run.switch_back_ms if run.switch_back_ms is not None else '-'} ms "
          + (f"late={run.late_answers} over {run.late_for:.3f}s " if run.rps is not None else "")
          + (f"route={run.route} " if run.route else "") + run.note, flush=True)


async def traffic_phase(p: Project, kinds: list[tuple[str, dict[str, Any], str]], runs: int,
                        out: list[Run], stale: list[str]) -> Traffic:
    traffic = Traffic(p.port)
    traffic.start()
    try:
        await asyncio.sleep(5)  # the old slot's baseline
        traffic.steady_rps = sum(traffic.answered.values()) / (time.monotonic() - traffic.started)
        print(f"steady load on v1: {traffic.steady_rps:.0f} req/s", flush=True)
        for kind, spec, _ in kinds:
            print(f"{kind}:", flush=True)
            for i in range(1, runs + 1):
                run = await traffic_run(p, traffic, kind, spec, f"{kind}-{i:02d}", "v1")
                show(run)
                out.append(run)
                await asyncio.sleep(1)  # the failed release is retired in the background
                if run.reason == "consecutive_failures":
                    flush = f"flush-{len(stale) + 1:02d}"
                    by = await flush_stale_run(p, traffic, flush, "v1")
                    print(f"  {flush:<14} healthy: " + (f"rolled back on {by}'s evidence" if by else "went live"),
                          flush=True)
                    stale.append(by or "")
                    await asyncio.sleep(1)
    finally:
        await traffic.stop()
    return traffic


async def crash_phase(p: Project, runs: int, out: list[Run]) -> None:
    print(f"{CRASH_KIND[0]}:", flush=True)
    for i in range(1, runs + 1):
        run = await crash_run(p, CRASH_KIND[1], f"crash-{i:02d}")
        show(run)
        out.append(run)
        await asyncio.sleep(1)


def summarise(runs: list[Run], traffic: Traffic | None, n: int, stale: list[str]) -> dict[str, Any]:
    rows = []
    for kind, _, label in [*TRAFFIC_KINDS, CRASH_KIND]:
        rs = [r for r in runs if r.kind == kind]
        if not rs:
            continue
        users = [r.users_back for r in rs if r.users_back is not None]
        hist = [r.history_back for r in rs if r.history_back is not None]
        switch = [r.switch_back_ms for r in rs if r.switch_back_ms is not None]
        rps = [r.rps for r in rs if r.rps is not None]
        rows.append({
            "kind": kind, "label": label, "runs": len(rs), "rolled_back": sum(r.rolled_back for r in rs),
            "reasons": dict(Counter(r.reason or "-" for r in rs)),
            "users_median": statistics.median(users) if users else None, "users_worst": max(users, default=None),
            "history_median": statistics.median(hist) if hist else None, "history_worst": max(hist, default=None),
            "switch_ms_median": statistics.median(switch) if switch else None,
            "switch_ms_worst": max(switch, default=None),
            "rps_min": min(rps, default=None), "rps_max": max(rps, default=None),
            "late_answers": sum(r.late_answers for r in rs),
            "routes": dict(Counter(r.route for r in rs if r.route)),
        })
    healthy = []
    for kind, _, label in HEALTHY_KINDS:
        rs = [r for r in runs if r.kind == kind]
        if rs:
            healthy.append({"kind": kind, "label": label, "runs": len(rs),
                            "false_rollbacks": sum(r.rolled_back for r in rs),
                            "reasons": dict(Counter(r.reason for r in rs if r.rolled_back)),
                            "rps_start": [min(r.rps or 0 for r in rs), max(r.rps or 0 for r in rs)],
                            "rps_end": [min(r.rps_end or 0 for r in rs), max(r.rps_end or 0 for r in rs)]})
    out: dict[str, Any] = {"runs_per_kind": n, "kinds": rows, "healthy": healthy, "runs": [r.__dict__ for r in runs],
                           "flush_deploys": len(stale), "flush_rolled_back_on_stale_evidence": sum(map(bool, stale))}
    if traffic is not None:
        total = sum(traffic.answered.values())
        out["traffic"] = {"answered": dict(traffic.answered), "failed": dict(traffic.failed),
                          "connection_errors": dict(traffic.conn_errors),
                          "req_per_s": total / max(traffic.stopped - traffic.started, 1e-9),
                          "steady_req_per_s": traffic.steady_rps}
    return out


def table(summary: dict[str, Any]) -> str:
    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    lines = ["| fault | load at onset | rolled back | trigger (runs) | onset → v1 answers, median / worst"
             " | onset → history, median / worst | switch back, median / worst | failed release answered after |",
             "|---|---|---|---|---|---|---|---|"]
    for k in summary["kinds"]:
        reasons = ", ".join(f"`{r}` ({c})" for r, c in k["reasons"].items())
        if k["routes"]:
            reasons += " naming " + ", ".join(f"`{r}` ({c})" for r, c in k["routes"].items())
        sw = "-" if k["switch_ms_median"] is None else f"{k['switch_ms_median']:.1f} / {k['switch_ms_worst']:.1f} ms"
        load = "none" if k["rps_min"] is None else f"{k['rps_min']:.0f}–{k['rps_max']:.0f} req/s"
        late = "-" if k["rps_min"] is None else str(k["late_answers"])
        lines.append(f"| {k['label']} | {load} | {k['rolled_back']}/{k['runs']} | {reasons} | "
                     f"{s(k['users_median'])} / {s(k['users_worst'])} | "
                     f"{s(k['history_median'])} / {s(k['history_worst'])} | {sw} | {late} |")
    return "\n".join(lines)


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with SIGTERM/SIGHUP cancelling the run (so CLI children are killed) like Ctrl-C."""
    async def guarded() -> T:
        task, loop = asyncio.current_task(), asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
        return await coro

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        raise SystemExit("interrupted") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="runs per fault kind")
    ap.add_argument("--kinds", default=",".join(ALL_KINDS), help=f"subset of {','.join(ALL_KINDS)}")
    ap.add_argument("--healthy-runs", type=int, default=20, help="healthy ramped deploys (ramp10)")
    ap.add_argument("--healthy-observe", default="30s", help="observation window of the healthy deploys")
    ap.add_argument("--json", type=Path, help="write the summary and every run here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects (logs) afterwards")
    args = ap.parse_args()
    wanted = set(args.kinds.split(","))
    if wanted - set(ALL_KINDS):
        ap.error(f"unknown kinds: {', '.join(sorted(wanted - set(ALL_KINDS)))}")

    # Outside the event loop too, SIGTERM/SIGHUP end the run through the finally below.
    def bye(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGHUP, bye)

    tmp = Path(tempfile.mkdtemp(prefix="changeover-rollback-bench-"))
    runs: list[Run] = []
    stale: list[str] = []  # per flush deploy: the version whose evidence rolled it back, "" if none
    traffic: Traffic | None = None
    projects: list[Project] = []
    ok = False
    try:
        kinds = [k for k in TRAFFIC_KINDS if k[0] in wanted]
        if kinds:
            p = Project(tmp / "traffic")
            projects.append(p)
            p.write()
            p.start()
            run_loop(p.deploy("v1"))
            traffic = run_loop(traffic_phase(p, kinds, args.runs, runs, stale))
            p.stop()
        if CRASH_KIND[0] in wanted:
            p = Project(tmp / "crash", synthetic_rate=0)
            projects.append(p)
            p.write()
            p.start()
            run_loop(p.deploy("v1"))
            run_loop(crash_phase(p, args.runs, runs))
            p.stop()
        healthy = [k for k in HEALTHY_KINDS if k[0] in wanted]
        if healthy:
            p = Project(tmp / "healthy", observe=args.healthy_observe)
            projects.append(p)
            p.write()
            p.start()
            run_loop(p.deploy("v1"))
            counts = {"ramp10": args.healthy_runs, "background1": args.runs}
            run_loop(healthy_phase(p, healthy, counts, runs))
            p.stop()
        ok = True
    finally:
        for p in projects:
            p.stop()
        if args.keep or not ok:
            print(f"projects and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarise(runs, traffic, args.runs, stale)
    print()
    print(table(summary))
    if traffic is not None:
        t = summary["traffic"]
        print(f"\nload: 8 keep-alive connections, {t['steady_req_per_s']:.0f} req/s on v1 alone, "
              f"{t['req_per_s']:.0f} req/s over the whole phase; answered {t['answered']}; "
              f"5xx {t['failed']}; connection errors {t['connection_errors']}")
        print(f"requests answered by v1 that failed: {traffic.failed.get('v1', 0)}")
    full = next((k for k in summary["kinds"] if k["kind"] == "errors100"), None)
    if full is not None and full["users_worst"] is not None:
        met = full["users_worst"] <= TARGET and full["rolled_back"] == full["runs"]
        print(f"target (100 % errors: onset -> v1 answers <= {TARGET:g} s): worst {full['users_worst']:.2f} s, "
              + ("met" if met else "NOT met"))
    if stale:
        print(f"healthy flush deploys rolled back on the previous release's evidence: "
              f"{summary['flush_rolled_back_on_stale_evidence']}/{len(stale)}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    for h in summary["healthy"]:
        print(f"{h['label']}: false rollbacks {h['false_rollbacks']}/{h['runs']} "
              f"(load {h['rps_start'][0]:.0f}–{h['rps_start'][1]:.0f} req/s at the switch, "
              f"{h['rps_end'][0]:.0f}–{h['rps_end'][1]:.0f} req/s at the end) {h['reasons'] or ''}")
    healthy_kinds = {k[0] for k in HEALTHY_KINDS}
    missed = [r.version for r in runs if not r.rolled_back and r.kind not in healthy_kinds]
    missed += [r.version for r in runs if r.rolled_back and r.kind in healthy_kinds]
    v1_failed = traffic.failed.get("v1", 0) if traffic is not None else 0
    if missed:
        print(f"not rolled back: {', '.join(missed)}")
    return 1 if missed or v1_failed else 0


if __name__ == "__main__":
    sys.exit(main())
