"""Flower's deployment engine on loopback for tests: processes with logs, bounded waits, clean stops.

Every process starts in its own session (process group) with its output in a log file, and
`stop_all` ends the group and every descendant, also those Flower detaches into new sessions
(the SuperExec processes that start ServerApps and ClientApps).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# The venv's executables (flower-superlink, flwr, ...) sit next to its python: no PATH lookup.
BIN = Path(sys.executable).parent
_ACCESS_LOG = re.compile(r'"(GET|POST) /')


def executable(name: str) -> str:
    """The path of one of Flower's executables in this interpreter's environment."""
    path = BIN / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install FedFusion into this venv (`make install`).")
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(flwr_home: Path) -> dict[str, str]:
    """Environment for one Flower process: its own FLWR_HOME, this venv first, nothing phoned home."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        # Flower starts flower-superexec / flwr-clientapp / flwr-serverapp through PATH
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def log_tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log, without the HTTP access lines that fill it."""
    if not path.exists():
        return "(no log)"
    kept = [ln for ln in path.read_text(errors="replace").splitlines() if not _ACCESS_LOG.search(ln)]
    return "\n".join(kept[-lines:])


@dataclass
class Started:
    """One process started by a test, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Processes:
    """The processes of one test federation."""

    log_dir: Path
    started: list[Started] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path) -> Started:
        """Start `argv` in a new session, stdout and stderr into `<log_dir>/<name>.log`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd, start_new_session=True)
        started = Started(name, proc, log)
        self.started.append(started)
        return started

    def report(self) -> str:
        """Each process' exit status and log tail, for a failure message."""
        parts = []
        for s in self.started:
            status = "running" if s.proc.poll() is None else f"exit code {s.proc.returncode}"
            parts.append(f"--- {s.name} ({status}), {s.log} ---\n{log_tail(s.log)}")
        return "\n".join(parts)

    def wait_exit(self, started: Started, timeout: float) -> int:
        """Wait for one process to end; fail with every log tail after `timeout` seconds."""
        try:
            return started.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{started.name} still running after {timeout:.0f} s.\n{self.report()}") from None

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float,
                   must_live: Sequence[Started] = ()) -> None:
        """Poll `ready` until true; fail early if a `must_live` process ends, or after `timeout`."""
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [s.name for s in must_live if s.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {timeout:.0f} s"
                raise AssertionError(f"Waiting for {what}: {why}.\n{self.report()}")
            time.sleep(0.5)

    def stop_all(self, grace: float = 10.0) -> None:
        """Stop every started process, its process group and all its descendants."""
        victims: list[psutil.Process] = []
        for s in self.started:
            try:
                victims += psutil.Process(s.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for s in reversed(self.started):  # SuperNodes before the SuperLink
            if s.proc.poll() is None:
                _signal_group(s.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for s in self.started:
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(s.proc.pid, signal.SIGKILL)
                s.proc.wait(timeout=5)
        _, alive = psutil.wait_procs(victims, timeout=max(0.1, deadline - time.monotonic()))
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session: the group id is the leader's pid
    except ProcessLookupError:
        pass


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def flwr_json(argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> dict:
    """Run a `flwr ... --format json` command; its JSON answer (fail with its output if none)."""
    out = subprocess.run([executable("flwr"), *argv, "--format", "json"], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=timeout)
    start = out.stdout.find("{")
    try:
        return json.loads(out.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError as err:
        raise AssertionError(f"flwr {' '.join(argv)} printed no JSON ({err}):\n{out.stdout}\n"
                             f"{out.stderr}") from err
