"""A real project on disk, a real daemon process, real app processes, and a keep-alive load client."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from changeover import commands
from changeover.config import locate
from changeover.daemon.procs import free_port
from changeover.loadgen import Load, get
from changeover.state import State
from changeover.state_schema import Step

__all__ = ["EXAMPLE", "Load", "Project", "free_port", "get"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "app" / "server.py"


@dataclass
class Project:
    """`workers` proxy processes unless the config written names its own: one by default (each
    worker is a process started, switched and handed over), two for the tests about several."""
    root: Path
    port: int = field(default_factory=free_port)
    daemon: subprocess.Popen[bytes] | None = None
    extra: str = ""
    workers: int = 1

    @property
    def config(self) -> Path:
        return self.root / "changeover.toml"

    def write(self, extra: str = "", app: str = "", ready_timeout: str = "20s") -> None:
        self.extra = extra
        workers = "" if re.search(r"^\s*workers\s*=", extra, re.M) else f"workers = {self.workers}"
        self.config.write_text(f"""
[app]
command = [{json.dumps(sys.executable)}, "server.py", "$PORT"]
health_path = "/health"
ready_timeout = "{ready_timeout}"
stop_timeout = "5s"
health_interval = "100ms"
{app}
[proxy]
listen = "127.0.0.1:{self.port}"
drain_timeout = "5s"
{workers}
{extra}
""")
        if "[dashboard]" not in extra:
            # One port per host by default (9180): the tests' many daemons run without it.
            with self.config.open("a") as f:
                f.write('\n[dashboard]\nlisten = ""\n')
        if "[monitor]" not in extra:
            # No observation window unless a test asks for one; no metrics endpoint.
            with self.config.open("a") as f:
                f.write('\n[monitor]\nobserve = "0s"\nmetrics_listen = ""\n')

    def release(self, version: str) -> Path:
        d = self.root / "releases" / version
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLE, d / "server.py")
        return d

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "changeover", *args, "-c", str(self.config)], cwd=self.root,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"changeover {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def deploy(self, version: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli("deploy", version, "--path", str(self.release(version)), *extra, check=check)

    def verb(self, name: str, timeout: float = 120, **kw: Any) -> Any:
        """What `changeover NAME --json` prints, from the function of `changeover.commands` the CLI
        calls, in this process: for the tests that run a verb over and over (a Python start
        each is ~0.5 s), polling and teardown. Not for a [fleet] host, whose CLI speaks for the fleet."""
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, getattr(commands, name)(locate(self.config), **kw)))
            except BaseException as e:  # raised again in the caller's thread
                box.append((False, e))

        # A thread of its own: callers may be inside an event loop (a test's or Playwright's).
        t = threading.Thread(target=run, name=f"verb-{name}", daemon=True)
        t.start()
        t.join(timeout)
        if not box:
            raise TimeoutError(f"changeover {name}: no answer within {timeout} s")
        ok, out = box[0]
        if not ok:
            raise out
        return json.loads(json.dumps(out, default=str))

    def deployed(self, version: str) -> dict[str, Any]:
        """`deploy VERSION --path releases/VERSION`, through the function the CLI calls, in this
        process: for a test's setup deploys, whose output nothing reads (deploy() runs the CLI,
        for the tests of what it prints and its exit code). Raises if the deploy fails."""
        return dict(self.verb("deploy", version=version, path=str(self.release(version))))

    def status(self) -> dict[str, Any]:
        if "[fleet]" in self.config.read_text():
            return dict(json.loads(self.cli("status", "--json").stdout))
        return dict(self.verb("status"))

    def answers(self) -> bool:
        """The daemon's control socket answers `status` (asked in this process, as above)."""
        sock = locate(self.config).socket_path   # a deep project's is elsewhere (changeover/sockets.py)
        if not sock.exists():
            return False
        try:
            self.status()
        except Exception:
            return False
        return True

    def start_daemon(self) -> None:
        log = open(self.root / "serve.out", "ab")  # noqa: SIM115
        self.daemon = subprocess.Popen([sys.executable, "-m", "changeover", "serve", "-c", str(self.config)],
                                       cwd=self.root, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise AssertionError("daemon exited:\n" + (self.root / "serve.out").read_text()[-3000:])
            if self.answers():
                return
            time.sleep(0.1)
        raise AssertionError("daemon did not come up:\n" + (self.root / "serve.out").read_text()[-3000:])

    def wait_for_step(self, prefix: str, timeout: float = 30) -> None:
        """Block until a step whose name starts with `prefix` is running, read from the state file."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            step = self.running_step()
            if step is not None and step.name.startswith(prefix):
                return
            time.sleep(0.05)
        raise AssertionError(f"no step '{prefix}…' started within {timeout} s")

    def running_step(self, deployment_kind: str | None = None) -> Step | None:
        """The step running now, read from the state file (as the next daemon would)."""
        path = self.root / ".changeover" / "state.db"
        if not path.exists():
            return None
        st = State(path, readonly=True)
        try:
            return st.running_step(deployment_kind)
        finally:
            st.close()

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(sig)
        self.daemon.wait(timeout=30)
        self.daemon = None

    def down(self) -> str:
        """`changeover down` for the teardown, in this process; what it answered, or why it failed."""
        try:
            return repr(self.verb("down", timeout=60))
        except Exception as e:  # the caller waits for the daemon, then kills what is left
            return f"{type(e).__name__}: {e}"

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def teardown(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            down = self.down()
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with (self.root / "serve.out").open("a") as f:  # evidence for whoever reads the log
                    f.write(f"\n[harness] daemon still running 30 s after down -> {down}\n")
        elif (self.root / ".changeover").exists():
            # No daemon: start one just to bring everything down cleanly.
            with contextlib.suppress(Exception):
                self.start_daemon()
                self.down()
                assert self.daemon is not None
                self.daemon.wait(timeout=30)
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
        # Last resort: nothing a test started may outlive it.
        for pid in _pids_under(self.root):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def _pids_under(root: Path) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cwd = os.readlink(d / "cwd")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if cwd.startswith(str(root)) or str(root).encode() in cmd:
            out.append(int(d.name))
    return out
