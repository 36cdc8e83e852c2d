"""docs/config-reference.md is what scripts/config_reference.py writes from the loaders now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_is_up_to_date() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr + "\n(the loaders changed: run .venv/bin/python scripts/config_reference.py)"


def test_every_section_and_the_new_keys_are_there() -> None:
    text = (ROOT / "docs" / "config-reference.md").read_text()
    for head in ("[app]", "[env]", "[proxy]", "[releases]", "[migrations]", "[checks.pre]", "[[checks.smoke]]",
                 "[[checks.flow.steps]]", "[checks.session]", "[monitor]", "[[notify.webhooks]]"):
        assert f"## `{head}`" in text, head
    for row in ("| `build` | list of strings |", "| `build_timeout` | duration | `\"10m\"` |",
                "| `keep` | integer | `5` |", "| `command` | list of strings | required |"):
        assert row in text, row
