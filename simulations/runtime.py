"""Flower's supported simulation path (flwr 1.42): `flwr run` against a private local SuperLink in
simulation mode, started for one run and stopped after it.

The SuperLink listens on a free loopback port with its state in memory and its own `FLWR_HOME`
(a temporary folder), so it never meets another user's SuperLink, and runs the simulation
runtime (Ray backend) in a subprocess. `flwr run` submits this checkout as the app with the
whole run config (a TOML file) and the federation's size and Ray resources. Flower's and Ray's
output goes to a log file (echoed with `verbose`); the caller sees each round as its line
reaches the run folder's `history.jsonl`. Every process started here, and everything they
started, is stopped before `run_local` returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError
from common.runfolder import SUMMARY, HistoryLine, RunFolder
from simulations.loopback import Processes, base_env, executable, free_port, log_tail, port_open

log = logging.getLogger(__name__)

APP_ROOT = (
    Path(__file__).resolve().parent.parent
)  # the FedFusion checkout: the app `flwr run` ships
CONNECTION = "fedfusion-local"
START_TIMEOUT = 60.0  # seconds for the SuperLink to listen
TEARDOWN_WAIT = 3.0  # seconds `flwr run` may take to end after the run's summary is written
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL when stopping (state is in memory only)


@dataclass(frozen=True, kw_only=True)
class LocalRun:
    """How `flwr run` ended, and its log."""

    returncode: int
    log_tail: str


def toml_value(value: Any) -> str:
    """A run-config value as TOML (strings as JSON strings, which TOML reads alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def federation_config(hospitals: int, *, cluster: bool, verbose: bool) -> str:
    """`--federation-config`: N SuperNodes, one CPU per ClientApp; this machine's cores unless on
    an existing Ray cluster (`RAY_ADDRESS`), whose nodes bring theirs."""
    parts = [
        f"num-supernodes={hospitals}",
        "client-resources-num-cpus=1",
        "client-resources-num-gpus=0.0",
        "init-args-logging-level='WARNING'",
        f"init-args-log-to-driver={'true' if verbose else 'false'}",
        f"verbose={'true' if verbose else 'false'}",
    ]
    if not cluster:
        parts.append(f"init-args-num-cpus={os.cpu_count() or 1}")
    return " ".join(parts)


def run_local(
    user_config: Mapping[str, Any],
    hospitals: int,
    folder: RunFolder,
    *,
    cluster: bool,
    verbose: bool,
    on_round: Callable[[HistoryLine], None] | None = None,
) -> LocalRun:
    """Run the federation on a private local SuperLink; report each finished round to `on_round`."""
    if not (APP_ROOT / "pyproject.toml").is_file():
        raise ConfigError(
            f"{APP_ROOT} holds no pyproject.toml: `fedfusion simulate` ships "
            "the FedFusion checkout as the app; install it from a checkout "
            "(`make install`)."
        )
    with tempfile.TemporaryDirectory(prefix="fedfusion-sim-") as tmp:
        home = Path(tmp)
        procs = Processes(home / "logs")
        try:
            return _run(
                procs,
                home,
                user_config,
                hospitals,
                folder,
                cluster=cluster,
                verbose=verbose,
                on_round=on_round,
            )
        finally:
            log.debug("stopping the local SuperLink and everything it started")
            procs.stop_all(grace=STOP_GRACE)


def _run(
    procs: Processes,
    home: Path,
    user_config: Mapping[str, Any],
    hospitals: int,
    folder: RunFolder,
    *,
    cluster: bool,
    verbose: bool,
    on_round: Callable[[HistoryLine], None] | None,
) -> LocalRun:
    port = free_port()
    env = base_env(home)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )  # loopback only, this run only
    superlink = procs.start(
        "superlink",
        [
            executable("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        env,
        home,
    )
    procs.wait_until(
        "the local SuperLink to listen", lambda: port_open(port), START_TIMEOUT, [superlink]
    )
    run_config = home / "run-config.toml"
    run_config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in user_config.items()))
    run = procs.start(
        "flwr-run",
        [
            executable("flwr"),
            "run",
            str(APP_ROOT),
            CONNECTION,
            "--stream",
            "--run-config",
            str(run_config),
            "--federation-config",
            federation_config(hospitals, cluster=cluster, verbose=verbose),
        ],
        env,
        home,
    )
    seen, echoed, started = 0, 0, time.time()
    summary = folder.path / SUMMARY
    while True:
        done = run.proc.poll() is not None
        if not done and summary.is_file() and summary.stat().st_mtime >= started:
            # the ServerApp's last write: the outputs are complete; Flower's own teardown (Ray's
            # shutdown, the log stream) is cut short by stopping every process
            log.debug("summary written; waiting for flwr run to end")
            done = _exited(run.proc, TEARDOWN_WAIT)
        lines = folder.read_history() if folder.path.is_dir() else []
        for line in lines[seen:]:
            if on_round is not None:
                on_round(line)
        seen = max(seen, len(lines))
        if verbose:
            echoed = _echo(run.log, echoed)
        if done:
            break
        time.sleep(0.5)
    code = run.proc.poll()
    return LocalRun(returncode=0 if code is None else code, log_tail=log_tail(run.log, 40))


def _exited(proc: subprocess.Popen[bytes], wait: float) -> bool:
    """Wait up to `wait` seconds for `proc` to end; True either way (the run's work is done)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=wait)
    return True


def _echo(path: Path, offset: int) -> int:
    """Copy what the log gained since `offset` to stderr; the new offset."""
    if not path.is_file():
        return offset
    with path.open("rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    sys.stderr.write(chunk.decode(errors="replace"))
    sys.stderr.flush()
    return offset + len(chunk)
