"""Coverage-guided fuzzing of the proxy's parsers with atheris (libFuzzer), on the corpus kept in
tests/fuzz/corpus/<target>/ (the seed, kept in the repository). Inputs that reach new code are
written to tests/fuzz/work/<target>/ (copy the interesting ones into corpus/); a failing input is
written to tests/fuzz/crashes/ and the run stops.

    .venv/bin/python -m tests.fuzz.run chunks -max_total_time=300
    make fuzz                  # every target, FUZZ_SECONDS each (default 120)

Without atheris (it is an optional dev dependency: `pip install atheris`), inputs are made by
hypothesis instead: not coverage-guided, but the same targets and checks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("chunks", "request_head", "response")   # tests.fuzz.targets.TARGETS, imported instrumented below


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in NAMES:
        print(f"usage: python -m tests.fuzz.run {{{','.join(NAMES)}}} [libFuzzer flags]", file=sys.stderr)
        return 2
    name, flags = argv[1], argv[2:]
    logging.disable(logging.WARNING)     # the proxy logs every 502 it answers
    corpus = HERE / "corpus" / name
    crashes = HERE / "crashes"
    crashes.mkdir(exist_ok=True)
    work = HERE / "work" / name          # new inputs land here (not committed); corpus/ is the seed
    work.mkdir(parents=True, exist_ok=True)
    try:
        import atheris  # type: ignore[import-untyped]
    except ImportError:
        return _hypothesis(name, flags)
    # Nothing of the proxy may be imported before this: only modules imported here are instrumented.
    with atheris.instrument_imports(include=["changeover.proxy", "tests.fuzz"]):
        from tests.fuzz.targets import TARGETS
    target = TARGETS[name]
    atheris.Setup([argv[0], *flags, f"-artifact_prefix={crashes}/{name}-", "-max_len=4096", str(work), str(corpus)],
                  target)
    atheris.Fuzz()
    return 0


def _hypothesis(name: str, flags: list[str]) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.fuzz.targets import TARGETS

    seconds = next((float(f.split("=", 1)[1]) for f in flags if f.startswith("-max_total_time=")), 60.0)
    print(f"atheris is not installed: {seconds:g}s of hypothesis inputs for {name}", file=sys.stderr)

    @settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=4096))
    def run(data: bytes) -> None:
        TARGETS[name](data)

    import time
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
