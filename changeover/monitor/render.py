"""Per-slot live numbers as a rich Table, for `changeover status` and `changeover top`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.table import Table
from rich.text import Text

from changeover.monitor.stats import WindowStats

ERROR_STYLE_AT = 0.05      # error rates at or above this are shown red (the default trigger)
WARN_STYLE_AT = 0.01


def fmt_latency(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds:.2f}s"


def fmt_rate(rate: float, requests: int) -> Text:
    if not requests:
        return Text("–", style="dim")
    style = "red bold" if rate >= ERROR_STYLE_AT else "yellow" if rate >= WARN_STYLE_AT else "green"
    return Text(f"{rate:.2%}", style=style)


def _as_stats(s: WindowStats | Mapping[str, Any]) -> WindowStats:
    return s if isinstance(s, WindowStats) else WindowStats.from_dict(dict(s))


def render_table(stats: Iterable[WindowStats | Mapping[str, Any]], live: str | None = None,
                 title: str | None = None) -> Table:
    """One row per slot: version, req/s, requests, error rate, p50/p95/p99. Accepts WindowStats or
    their to_dict() form as sent over the control socket. The live slot is marked and sorted first."""
    rows = sorted((_as_stats(s) for s in stats), key=lambda s: (s.slot != live, s.slot))
    table = Table(title=title, title_justify="left")
    table.add_column("slot")
    table.add_column("version")
    for name in ("req/s", "requests", "errors", "error rate", "p50", "p95", "p99"):
        table.add_column(name, justify="right")
    for s in rows:
        slot = Text(s.slot, style="bold")
        if s.slot == live:
            slot.append(" ● live", style="green")
        table.add_row(slot, s.version or "–", f"{s.rps:.1f}", str(s.requests), str(s.errors),
                      fmt_rate(s.error_rate, s.requests), fmt_latency(s.p50), fmt_latency(s.p95),
                      fmt_latency(s.p99))
    if not rows:
        table.add_row("(no traffic recorded yet)", "", "", "", "", "", "", "", "")
    return table


def judgement_lines(observing: Mapping[str, Any]) -> list[str]:
    """What the latency trigger compares right now, from Observer.status(): for `status`/`top`."""
    out = []
    lat = observing.get("latency") or {}
    if lat:
        load = lat.get("load", {})
        base = lat.get("baseline") or {}
        line = f"latency: {load.get('rps', 0):.0f} req/s judged against {lat.get('source', '?')}"
        if base:
            line += (f" ({base.get('source')}: {base.get('rps', 0):.0f} req/s, p95 "
                     f"{base.get('p95_ms')} ms, {base.get('requests')} samples; limit {lat.get('limit_ms')} ms)")
        if lat.get("vetoed"):
            line += "; vetoed: " + str(lat["vetoed"])
        out.append(line)
    probes = observing.get("paired_probes")
    if probes:
        out.append(f"paired probes: {probes['pairs']} pairs, median new {probes['median_new_ms']} ms vs old "
                   f"{probes['median_old_ms']} ms, p = {probes['p']:.3g} ({probes['test']})")
    base = observing.get("baseline") or {}
    if base.get("rejected"):
        out.append(f"baseline rejected: {base['rejected']}")
    return out
