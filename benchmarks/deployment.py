"""Deployment against simulation: mean time per round of a real loopback federation over the same
run's time per round in the simulation.

The deployment is Flower's engine as a hospital runs it (`simulations.loopback`): a TLS SuperLink,
and per hospital a SuperNode in process isolation with its FedFusion node (warm across rounds).
The simulation runs the same run config on the same hospitals. A round's time is the interval
between consecutive round checkpoints (`round-NNN.safetensors`: written after each round's
aggregation, so an interval holds one evaluation and one training phase); round 1 is left out
(it fills the models and feature caches in both).

Beside the ratio, the overhead (deployed minus simulated seconds per round) and the same figure
for a plain Flower app on the same kind of loopback federation (`benchmarks.flower_floor_app`:
per node an evaluate and a train message a round, in one exchange as FedFusion's round, answered
at once by Flower's own runner at each SuperNode): what Flower's delivery costs a round whatever
the app.
"""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from benchmarks.record import Outcome
from benchmarks.workloads import demo_hospitals
from common.config import default_user_config
from common.runfolder import RunFolder
from simulations.loopback import LoopbackError, LoopbackFederation
from simulations.run import simulate

ROOT = Path(__file__).resolve().parent.parent
HOSPITALS = 2
RUN_TIMEOUT = 1800.0
MESSAGES_PER_ROUND = 2  # FedFusion's round: per site an evaluate, then a train message
FLOOR_APP = Path(__file__).resolve().parent / "flower_floor_app.py"
# Flower's runner polls its SuperNode for a task every 1 s by default; FedFusion's node every
# 50 ms while a run is active: the floor polls as often, so only the SuperNode's waits remain
FLOOR_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05"}
FLOOR_PYPROJECT = """[project]
name = "flower-floor"
version = "1.0.0"
description = "A plain Flower app: tiny messages answered at once (FedFusion's benchmarks)."
license = "Apache-2.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "fedfusion-benchmarks"

[tool.flwr.app.components]
serverapp = "floor_app:serverapp"
clientapp = "floor_app:clientapp"

[tool.flwr.app.config]
num-server-rounds = 4
messages-per-round = 2
min-nodes = 2
round-times-file = ""
output-dir = ""
run-name = ""
"""


def round_seconds(folder: RunFolder, rounds: int) -> list[float]:
    """Seconds between consecutive round checkpoints, rounds 2..`rounds`."""
    times = [folder.round_checkpoint(r).stat().st_mtime for r in range(1, rounds + 1)]
    return [b - a for a, b in itertools.pairwise(times)]


def _deployed(work: Path, folders: list[Path], run_config: str, rounds: int) -> list[float]:
    fed = LoopbackFederation(work / "deployment", ROOT)
    try:
        fed.start({f.name: f / "manifest.csv" for f in folders}, {})
        run = fed.submit("deployed", run_config)
        return round_seconds(RunFolder(fed.finish(run, "deployed", RUN_TIMEOUT)), rounds)
    finally:
        fed.stop()


def _simulated(work: Path, data_root: Path, rounds: int, overrides: dict[str, Any]) -> list[float]:
    config = {
        **default_user_config(),
        **overrides,
        "data-root": str(data_root),
        "state-root": str(work / "sim-state"),
        "output-dir": str(work / "sim-outputs"),
        "run-name": "simulated",
        "num-server-rounds": rounds,
        "min-nodes": HOSPITALS,
    }
    simulate(config, HOSPITALS)
    return round_seconds(RunFolder(work / "sim-outputs" / "simulated"), rounds)


def floor_bundle(folder: Path) -> Path:
    """A folder `flwr run` submits: the plain Flower app and its pyproject.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FLOOR_APP, folder / "floor_app.py")
    (folder / "pyproject.toml").write_text(FLOOR_PYPROJECT)
    return folder


def flower_floor(work: Path, *, rounds: int, messages: int = MESSAGES_PER_ROUND) -> list[float]:
    """Seconds per round (rounds 2..N) of the plain Flower app on a loopback federation."""
    app = floor_bundle(work / "floor-app")
    times = work / "floor-round-times.jsonl"
    fed = LoopbackFederation(work / "floor", app)
    try:
        fed.start_plain([f"hospital-{i}" for i in range(HOSPITALS)], FLOOR_ENV)
        run = fed.submit(
            "floor",
            f"num-server-rounds={rounds} messages-per-round={messages} "
            f"min-nodes={HOSPITALS} round-times-file='{times}'",
            app,
        )
        code = fed.procs.wait_exit(run, RUN_TIMEOUT)
        lines = times.read_text().splitlines() if times.is_file() else []
        ends = [float(json.loads(line)) for line in lines]
        if code != 0 or len(ends) != rounds:
            raise LoopbackError(f"the plain Flower app did not finish.\n{fed.procs.report()}")
    finally:
        fed.stop()
    return [b - a for a, b in itertools.pairwise(ends)]


def _toml(value: Any) -> str:
    """A run-config value as `flwr run --run-config` reads it."""
    if isinstance(value, str):
        return f"'{value}'"
    return str(value).lower() if isinstance(value, bool) else str(value)


def measure(
    work: Path, *, preset: str, rounds: int, scale: float, overrides: dict[str, Any] | None = None
) -> tuple[list[float], list[float]]:
    """Seconds per round (rounds 2..N) deployed and simulated, for one run config.

    `overrides`: further run-config keys (kebab-case) for both runs.
    """
    folders = demo_hospitals(work / "data", HOSPITALS, size_scale=scale)
    values = {"preset": preset, **(overrides or {})}
    run_config = " ".join(
        [
            *(f"{k}={_toml(v)}" for k, v in values.items()),
            f"num-server-rounds={rounds}",
            f"min-nodes={HOSPITALS}",
        ]
    )
    deployed = _deployed(work, folders, run_config, rounds)
    simulated = _simulated(work, work / "data", rounds, values)
    return deployed, simulated


def run(quick: bool, work: Path) -> Outcome:
    """Demo preset, 2 hospitals, DP: deployment and simulation of the same run; Flower's floor."""
    scale, rounds = (0.3, 4) if quick else (1.0, 6)
    deployed, simulated = measure(work, preset="demo", rounds=rounds, scale=scale)
    floor = flower_floor(work, rounds=rounds)
    ratio = statistics.mean(deployed) / statistics.mean(simulated)
    overhead = statistics.mean(deployed) - statistics.mean(simulated)
    floor_overhead = statistics.mean(floor)  # the plain app computes nothing: all overhead
    return Outcome(
        key="deployment_round_ratio",
        value=ratio,
        target="<= 1.5",
        note="mean seconds per round (rounds 2..N, one exchange: per site the evaluation of the "
        "last aggregate, then training) of a real loopback "
        "federation (TLS SuperLink, per hospital a SuperNode in process isolation + its "
        "FedFusion node) over the same run's in the simulation; demo preset, DP. "
        "deployment_round_overhead_s: deployed minus simulated seconds per round, against "
        "flower_floor_round_overhead_s: a round of a plain Flower app (the same messages, "
        "tiny, answered at once by Flower's own runner: a process per task) on the same kind "
        "of federation, a reference with no target of its own",
        settings={
            "preset": "demo",
            "hospitals": HOSPITALS,
            "rounds": rounds,
            "data_scale": scale,
            "messages_per_round": MESSAGES_PER_ROUND,
        },
        raw={
            "deployed_round_s": deployed,
            "simulated_round_s": simulated,
            "flower_floor_round_s": floor,
        },
        extra={
            "deployment_round_overhead_s": (overhead, f"<= {floor_overhead:.1f}"),
            "flower_floor_round_overhead_s": (floor_overhead, ">= 0"),
        },
    )
