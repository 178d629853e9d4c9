"""Deployment against simulation: mean time per round of a real loopback federation over the same
run's time per round in the simulation.

The deployment is Flower's engine as a hospital runs it (`simulations.loopback`): a TLS SuperLink,
and per hospital a SuperNode in process isolation with its FedFusion node (warm across rounds).
The simulation runs the same run config on the same hospitals. A round's time is the interval
between consecutive round checkpoints (`round-NNN.safetensors`: written after each round's
aggregation, so an interval holds one evaluation and one training phase); round 1 is left out
(it fills the models and feature caches in both).
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Any

from benchmarks.record import Outcome
from benchmarks.workloads import demo_hospitals
from common.config import default_user_config
from common.runfolder import RunFolder
from simulations.loopback import LoopbackFederation
from simulations.run import simulate

ROOT = Path(__file__).resolve().parent.parent
HOSPITALS = 2
RUN_TIMEOUT = 1800.0


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
    """Demo preset, 2 hospitals, DP: deployment and simulation of the same run."""
    scale, rounds = (0.3, 4) if quick else (1.0, 6)
    deployed, simulated = measure(work, preset="demo", rounds=rounds, scale=scale)
    ratio = statistics.mean(deployed) / statistics.mean(simulated)
    return Outcome(
        key="deployment_round_ratio",
        value=ratio,
        target="<= 1.5",
        note="mean seconds per round (rounds 2..N, train + evaluate) of a real loopback "
        "federation (TLS SuperLink, per hospital a SuperNode in process isolation + its "
        "FedFusion node) over the same run's in the simulation; demo preset, DP",
        settings={"preset": "demo", "hospitals": HOSPITALS, "rounds": rounds, "data_scale": scale},
        raw={"deployed_round_s": deployed, "simulated_round_s": simulated},
    )
