"""Log reading: tail from the end, follow across files appearing, truncation and rotation."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from changeover.daemon.logs import follow, prune_release_logs, rotate, tail_lines


def test_tail_lines(tmp_path: Path) -> None:
    p = tmp_path / "big.log"
    p.write_text("".join(f"line {i}\n" for i in range(50_000)))
    assert tail_lines(p, 3) == ["line 49997", "line 49998", "line 49999"]
    assert tail_lines(p, 1) == ["line 49999"]
    assert len(tail_lines(p, 5000)) == 5000 and tail_lines(p, 5000)[0] == "line 45000"
    assert tail_lines(p, 0) == []
    q = tmp_path / "short.log"
    q.write_bytes(b"a\r\nb\n\nc \xff")  # CRLF, an empty line, no final newline, bad UTF-8
    assert tail_lines(q, 10) == ["a", "b", "", "c \ufffd"]
    assert tail_lines(q, 2) == ["", "c \ufffd"]
    assert tail_lines(tmp_path / "missing.log", 5) == []
    assert tail_lines(tmp_path, 5) == []
    (tmp_path / "empty.log").write_text("")
    assert tail_lines(tmp_path / "empty.log", 5) == []


class Reader:
    """Consumes follow() in a task, as `changeover logs -f` does, into a list the test waits on."""

    def __init__(self, paths: list[Path]) -> None:
        self.got: list[tuple[str, str]] = []
        self.task = asyncio.get_running_loop().create_task(self.run(follow(paths, n=2, interval=0.02)))

    async def run(self, it: AsyncIterator[tuple[Path, str]]) -> None:
        async for path, line in it:
            self.got.append((path.name, line))

    async def wait(self, n: int) -> list[tuple[str, str]]:
        for _ in range(500):
            if len(self.got) >= n:
                break
            await asyncio.sleep(0.02)
        out, self.got = self.got, []
        return out


def test_follow_appends_new_files_truncation_and_rotation(tmp_path: Path) -> None:
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("1\n2\n3\n")

    async def body() -> None:
        r = Reader([a, b])
        assert await r.wait(2) == [("a.log", "2"), ("a.log", "3")]
        with a.open("a") as f:
            f.write("4\npart")
        assert await r.wait(1) == [("a.log", "4")]
        with a.open("a") as f:
            f.write("ial\n")
        b.write_text("b1\n")  # appears later: read from its start
        assert sorted(await r.wait(2)) == [("a.log", "partial"), ("b.log", "b1")]
        a.rename(tmp_path / "a.log.1")  # rotation: the rest of the old file, then the new one
        with (tmp_path / "a.log.1").open("a") as f:
            f.write("5\n")
        a.write_text("new1\n")
        assert await r.wait(2) == [("a.log", "5"), ("a.log", "new1")]
        b.write_text("")  # truncated, then written again
        await asyncio.sleep(0.2)
        b.write_text("b2\n")
        assert await r.wait(1) == [("b.log", "b2")]
        r.task.cancel()
        await asyncio.gather(r.task, return_exceptions=True)
        assert r.got == []

    asyncio.run(body())


def test_rotate_copy_truncates_and_keeps_old_files(tmp_path: Path) -> None:
    p = tmp_path / "app.log"
    with p.open("ab") as writer:  # an app holding its O_APPEND descriptor across the rotation
        writer.write(b"x" * 100 + b"\n")
        writer.flush()
        assert not rotate(p, 1000)
        assert rotate(p, 50, keep=2)
        assert p.stat().st_size == 0 and (tmp_path / "app.log.1").stat().st_size == 101
        writer.write(b"second\n" * 10)
        writer.flush()
        assert rotate(p, 50, keep=2)
        writer.write(b"third\n")
        writer.flush()
    assert (tmp_path / "app.log.2").stat().st_size == 101
    assert (tmp_path / "app.log.1").read_bytes() == b"second\n" * 10
    assert p.read_bytes() == b"third\n"  # appended at the new end, no hole
    assert not rotate(tmp_path / "missing.log", 1)


def test_old_release_logs_are_pruned_per_slot(tmp_path: Path) -> None:
    d = tmp_path / "green"
    d.mkdir()
    for age, release in enumerate(["v7", "1.2.3", "v5", "v4", "v3"]):  # v7 newest
        for name in (f"{release}.0.log", f"{release}.1.log", f"{release}.0.log.1"):
            (d / name).write_text("x\n")
            os.utime(d / name, (1000 - age, 1000 - age))
    (d / "notes.txt").write_text("not a log")
    removed = prune_release_logs(d, keep=3, current="v8")
    # v8 (about to start) counts as one: the two newest others stay.
    assert sorted(p.name for p in removed) == sorted(
        f"{r}.{n}" for r in ("v5", "v4", "v3") for n in ("0.log", "1.log", "0.log.1"))
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["1.2.3.0.log", "1.2.3.0.log.1", "1.2.3.1.log", "notes.txt", "v7.0.log", "v7.0.log.1", "v7.1.log"])
    # Redeploying a release already on disk keeps its files; a missing directory is no error.
    assert len(prune_release_logs(d, keep=1, current="v7")) == 3
    assert {p.name for p in d.iterdir()} == {"notes.txt", "v7.0.log", "v7.0.log.1", "v7.1.log"}
    assert prune_release_logs(tmp_path / "missing", keep=1, current="v1") == []


def test_a_process_logging_to_its_stderr_keeps_that_file_bounded(tmp_path: Path) -> None:
    """bound_own_log (the proxy worker's proxy.log, the shared front's log): the file a process's
    stderr is appended to is rotated past max_bytes while the process keeps writing to it."""
    import subprocess
    import sys

    log_file = tmp_path / "proxy.log"
    child = (
        "import asyncio, sys\n"
        "from changeover.daemon.logs import bound_own_log\n"
        "async def main():\n"
        "    task = asyncio.get_running_loop().create_task(bound_own_log(2000, 2, every=0.05))\n"
        "    for i in range(400):\n"
        "        print(f'line {i:04d} ' + 'x' * 40, file=sys.stderr, flush=True)\n"
        "        await asyncio.sleep(0.002)\n"
        "    await asyncio.sleep(0.2)\n"
        "    task.cancel()\n"
        "asyncio.run(main())\n")
    with open(log_file, "ab") as err:
        subprocess.run([sys.executable, "-c", child], stderr=err, check=True, timeout=60)
    assert (tmp_path / "proxy.log.1").exists() and (tmp_path / "proxy.log.2").exists()
    assert not (tmp_path / "proxy.log.3").exists()        # keep = 2
    for name in ("proxy.log", "proxy.log.1", "proxy.log.2"):
        size = (tmp_path / name).stat().st_size
        assert size <= 2000 + 60 * 40, f"{name} is {size} bytes"   # rotated within a check interval
    newest = (tmp_path / "proxy.log").read_text().splitlines() or (tmp_path / "proxy.log.1").read_text().splitlines()
    assert newest[-1].startswith("line 0399"), newest[-1:]          # the writer went on after each rotation
