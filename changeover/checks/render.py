"""Results for people (a rich table) and for machines (JSON), shared by the CLI and `deploy`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from changeover.checks.result import CheckResult, failures, summary


def status_text(r: CheckResult) -> Text:
    if r.skipped:
        return Text("skip", style="dim")
    return Text("ok", style="green") if r.ok else Text("FAIL", style="bold red")


def results_table(results: Sequence[CheckResult], title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for r in results:
        table.add_row(r.name, status_text(r), f"{r.duration * 1000:.0f} ms", r.detail)
    return table


def results_doc(results: Sequence[CheckResult]) -> dict[str, Any]:
    """The JSON document: overall verdict, a one-line summary and every result."""
    return {"ok": not failures(list(results)), "summary": summary(list(results)),
            "results": [r.to_json() for r in results]}


def results_json(results: Sequence[CheckResult]) -> str:
    return json.dumps(results_doc(results), indent=2)


def print_results(results: Sequence[CheckResult], console: Console | None = None, *, as_json: bool = False,
                  title: str | None = None) -> None:
    console = console or Console()
    if as_json:
        # plain print: rich markup/highlighting must not touch machine output
        console.file.write(results_json(results) + "\n")
        return
    if not results:
        console.print(f"{title + ': ' if title else ''}no checks configured")
        return
    console.print(results_table(results, title))
    style = "green" if not failures(list(results)) else "bold red"
    console.print(Text(summary(list(results)), style=style))
