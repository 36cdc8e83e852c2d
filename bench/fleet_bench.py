"""Switch skew across a fleet: one etcd write watched by every host, against a host-by-host loop.

A real three-member etcd (/dev/shm data dirs) and two sets of three real daemons with the
example app on loopback:

- fleet: `changeover deploy` with [fleet]; the skew of each switch (first host live to last) is
  what the coordinator records from the hosts' own reports;
- loop (Kamal's way, host by host): every host prepared, then `switch` called on one host after
  the other through the control API from one process (no SSH: the fastest such loop can be);
  the skew is the first switch's answer to the last one's.

    .venv/bin/python bench/fleet_bench.py [--switches 20] [--json out.json] [--root /dev/shm]

--root puts the hosts' directories (their state databases) there: on /dev/shm a state write's
fsync costs nothing, which takes out the three daemons' writes queueing on this machine's one
disk (separate hosts each have their own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from changeover import api, rpc  # noqa: E402
from tests.fleet.cluster import Cluster  # noqa: E402
from tests.fleet.harness import MONITOR_OFF, Fleet, Host  # noqa: E402


def fleet_skews(fleet: Fleet, n: int) -> tuple[list[float], list[float]]:
    """(skew of the hosts going live, skew of the watch event reaching them)"""
    live, heard = [], []
    for i in range(n):
        fleet.deploy(f"f{i}")
        hist = json.loads(fleet.cli("history", "--json", "-n", "1").stdout)
        live.append(float(hist[0]["skew_ms"]))
        heard.append(float(hist[0]["notify_skew_ms"]))
    return live, heard


async def loop_skews(hosts: list[Host], n: int) -> list[float]:
    out = []
    for i in range(n):
        version = f"s{i}"
        for h in hosts:
            path = str(h.release(version))
            args = api.DeployArgs(version=version, path=path, wait=True, no_switch=True)
            await rpc.call(h.root / ".changeover" / "control.sock", str(api.Op.PREPARE), api.encode(args),
                           timeout=120, protocol=api.PROTOCOL)
        lives = []
        for h in hosts:                      # host by host
            await rpc.call(h.root / ".changeover" / "control.sock", str(api.Op.SWITCH),
                           api.encode(api.SwitchArgs(wait=False)), timeout=60, protocol=api.PROTOCOL)
            lives.append(time.time())
        out.append((lives[-1] - lives[0]) * 1000)
        for h in hosts:                      # let each finalise before the next round
            while (await rpc.call(h.root / ".changeover" / "control.sock", "status", {}, timeout=10,
                                  protocol=api.PROTOCOL)).get("deploying"):
                await asyncio.sleep(0.05)
    return out


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(xs), 2), "worst_ms": round(max(xs), 2), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--root", default=None, help="where the hosts' directories go (default: the temp dir)")
    a = ap.parse_args()
    cluster = Cluster.make(3)
    cluster.start()
    root = Path(tempfile.mkdtemp(prefix="co-fleet-bench-", dir=a.root))
    fleet = Fleet(root / "fleet", cluster.endpoints, "bench")
    plain = [Host(root / "loop" / f"h{i + 1}", name=f"h{i + 1}") for i in range(3)]
    try:
        fleet.start()
        for h in plain:
            h.root.mkdir(parents=True)
            h.write(MONITOR_OFF)
            h.spawn_daemon()
        for h in plain:
            h.wait_daemon()
        f, heard = fleet_skews(fleet, a.switches)
        s = asyncio.run(loop_skews(plain, a.switches))
    finally:
        fleet.teardown()
        for h in plain:
            h.teardown()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    result = {"fleet: live (one etcd write)": summary(f), "fleet: watch event heard": summary(heard),
              "host-by-host loop: live": summary(s)}
    print(f"switch skew across 3 hosts, {a.switches} switches each (hosts under {root.parent})")
    print(f"{'method':<30} {'p50':>9} {'worst':>9}")
    for k, v in result.items():
        print(f"{k:<30} {v['p50_ms']:>7.1f}ms {v['worst_ms']:>7.1f}ms")
    print("command: .venv/bin/python bench/fleet_bench.py " + " ".join(sys.argv[1:]))
    if a.json:
        Path(a.json).write_text(json.dumps({"fleet": f, "heard": heard, "loop": s, "summary": result}, indent=2))


if __name__ == "__main__":
    main()
