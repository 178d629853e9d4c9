"""`fedfusion run`: submit a run with `flwr run --stream`, then exit by the run's status.

Flower 1.42's `flwr run --stream` exits 0 once the run's log ends, whatever the run's status
(`flwr.cli.log.start_stream` returns normally when the SuperLink closes the stream), so a run
that stopped early or crashed looks like a success to a script or a service manager. This
command passes every line of `flwr run --stream` through, asks the SuperLink for the run's
status (`flwr list --run-id`), and ends with one line that says it: exit 0 for
`finished:completed`, 1 otherwise, with Flower's status details (a stopped run's reason).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

COMPLETED = "finished:completed"
_STARTED = re.compile(r"Successfully started run (\d+)")
STATUS_TIMEOUT = 60.0  # seconds for `flwr list` to answer


@dataclass(frozen=True, kw_only=True)
class RunStatus:
    """A Flower run's status as the SuperLink lists it (`finished:failed`) and its details."""

    status: str
    details: str


def flwr_executable() -> str:
    """`flwr` next to this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    found = str(beside) if beside.is_file() else shutil.which("flwr")
    if found is None:
        raise FileNotFoundError(
            "`flwr` is not installed next to this Python nor on PATH: activate the venv that "
            "holds FedFusion (`source .venv/bin/activate`) or install it (`make install`)."
        )
    return found


def build_parser() -> argparse.ArgumentParser:
    """`fedfusion run`'s options: those of `flwr run` that a FedFusion run uses."""
    p = argparse.ArgumentParser(
        prog="fedfusion run",
        description="Submit a run with `flwr run --stream`, show its log, and exit 1 unless "
        "it finished completed (the last line says its status and why).",
    )
    p.add_argument("app", help="the app folder `flwr run` packs and ships (the FedFusion folder)")
    p.add_argument("connection", help="the SuperLink connection's name in config.toml")
    p.add_argument(
        "--run-config",
        action="append",
        default=[],
        help="run-config overrides, as for `flwr run` (repeatable)",
    )
    return p


def run_status(flwr: str, connection: str, run_id: int) -> RunStatus:
    """The run's status and details from `flwr list --run-id` (the SuperLink's record)."""
    out = subprocess.run(
        [flwr, "list", connection, "--run-id", str(run_id), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=STATUS_TIMEOUT,
    )
    start = out.stdout.find("{")
    try:
        runs = json.loads(out.stdout[start:]).get("runs", []) if start >= 0 else []
    except json.JSONDecodeError:
        runs = []
    if not runs:
        answer = f"{out.stdout}{out.stderr}".strip()
        return RunStatus(
            status="unknown", details=f"`flwr list --run-id {run_id}` gave no status: {answer}"
        )
    return RunStatus(status=str(runs[0].get("status")), details=str(runs[0].get("status-details")))


def stream(argv: list[str]) -> tuple[int, int | None]:
    """Run `argv` (`flwr run --stream`), passing its output through; its exit code and run id."""
    run_id = None
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if run_id is None and (found := _STARTED.search(line)):
                run_id = int(found.group(1))
    return proc.returncode, run_id


def main(argv: list[str]) -> int:
    """`fedfusion run APP CONNECTION [--run-config ...]`: 0 only for a run that completed."""
    args = build_parser().parse_args(argv)
    flwr = flwr_executable()
    overrides = [a for config in args.run_config for a in ("--run-config", config)]
    code, run_id = stream([flwr, "run", args.app, args.connection, "--stream", *overrides])
    if code != 0:
        print(f"fedfusion run: `flwr run` failed (exit code {code}); see its output above.")
        return code
    if run_id is None:
        print("fedfusion run: `flwr run` started no run; see its output above.")
        return 1
    status = run_status(flwr, args.connection, run_id)
    if status.status == COMPLETED:
        print(f"run {run_id}: {status.status}")
        return 0
    print(f"run {run_id}: {status.status}: {status.details}")
    return 1
