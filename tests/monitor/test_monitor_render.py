from __future__ import annotations

from rich.console import Console

from changeover.monitor.metrics import Recorder
from changeover.monitor.render import fmt_latency, render_table
from tests.monitor.sim import FakeClock


def text(table: object) -> str:
    c = Console(width=120, record=True, color_system=None)
    c.print(table)
    return c.export_text()


def test_table_rows_per_slot_live_first(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    rec.set_version("blue", "v1")
    rec.set_version("green", "v2")
    for i in range(200):
        clock.advance(0.01)
        rec.record("blue", 200, 0.0005, False)
        rec.record("green", 500 if i % 10 == 0 else 200, 0.25, False)
    stats = [rec.window(s, 10) for s in rec.slots()]
    out = text(render_table([s.to_dict() for s in stats], live="green", title="last 10s"))
    lines = [ln for ln in out.splitlines() if "blue" in ln or "green" in ln]
    assert "green" in lines[0] and "live" in lines[0] and "blue" in lines[1]
    assert "10.00%" in lines[0] and "0.00%" in lines[1]
    assert "µs" in lines[1]                               # blue answers in 0.5 ms
    assert "ms" in lines[0] and "100.0" in lines[0]       # ~100 req/s over 2 s
    assert "last 10s" in out


def test_empty_and_formatting() -> None:
    assert "no traffic" in text(render_table([]))
    assert fmt_latency(None) == "–" and fmt_latency(0.00042) == "420µs"
    assert fmt_latency(0.0123) == "12.3ms" and fmt_latency(2.5) == "2.50s"


def test_judgement_lines_show_the_evidence() -> None:
    from changeover.monitor.render import judgement_lines

    lines = judgement_lines({
        "latency": {"source": "load_profile", "load": {"rps": 480.0, "level": 8}, "limit_ms": 31.2,
                    "baseline": {"source": "load_profile", "level": 8, "rps": 455.0, "requests": 52000,
                                 "p95_ms": 20.8}},
        "paired_probes": {"test": "wilcoxon_signed_rank", "pairs": 40, "w": 400.0, "z": 0.1, "p": 0.46,
                          "median_new_ms": 4.1, "median_old_ms": 4.0},
        "baseline": {"rejected": "21.0% errors in the last 60s (above 5.0%)"}})
    assert "480 req/s judged against load_profile" in lines[0] and "limit 31.2 ms" in lines[0]
    assert "40 pairs" in lines[1] and "rejected: 21.0% errors" in lines[2]
    assert judgement_lines({}) == []
