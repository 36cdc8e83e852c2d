"""The fuzz targets in `make test`: every corpus input, then a few seconds of hypothesis inputs
(raw bytes and mutations of corpus inputs) per target. `make fuzz` runs them coverage-guided."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"
FILES = sorted((p.parent.name, p) for p in CORPUS.glob("*/*") if p.is_file())


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)   # every refused response head is logged by the proxy
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize(("target", "path"), FILES, ids=[f"{t}/{p.name}" for t, p in FILES])
def test_corpus(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


def _mutated(target: str) -> st.SearchStrategy[bytes]:
    seeds = [p.read_bytes() for t, p in FILES if t == target]
    alphabet = st.sampled_from(list(b"\r\n\x00 \t:;,=\"0123456789abcdefxXAZ\x0b\x7f\xff"))

    def mutate(seed: bytes, edits: list[tuple[int, int, int]]) -> bytes:
        b = bytearray(seed)
        for op, pos, byte in edits:
            pos %= len(b) + 1
            if op == 0 and pos < len(b):
                b[pos] = byte
            elif op == 1:
                b[pos:pos] = bytes([byte])
            elif pos < len(b):
                del b[pos]
        return bytes(b)

    return st.builds(mutate, st.sampled_from(seeds),
                     st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4096), alphabet), max_size=6))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_short(target: str) -> None:
    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=512), _mutated(target)))
    def run(data: bytes) -> None:
        TARGETS[target](data)

    run()
