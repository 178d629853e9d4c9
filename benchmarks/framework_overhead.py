"""Framework overhead: a simulation's wall time against its sites' local compute.

Local compute is every ClientApp call timed inside the client (train and evaluate: data, model,
DP calibration, cache, training, ledger). The framework's share is the time during which no
site computes: Ray and app start-up, message passing, the server's screening, aggregation,
checkpoints and plots. Reported for the whole run and without the start-up (until the first
client call), also per round.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.record import Outcome
from benchmarks.simulation import timed_simulation
from benchmarks.workloads import demo_hospitals
from common.config import default_user_config

HOSPITALS = 3


def run(quick: bool, work: Path) -> Outcome:
    """Demo default (3 hospitals, DP, feature cache), 3 rounds."""
    scale, rounds = (0.3, 3) if quick else (1.0, 3)
    demo_hospitals(work / "data", HOSPITALS, size_scale=scale)
    config = {
        **default_user_config(),
        "data-root": str(work / "data"),
        "state-root": str(work / "state"),
        "output-dir": str(work / "outputs"),
        "num-server-rounds": rounds,
    }
    t = timed_simulation(config, HOSPITALS, work)
    after = t.wall_s - t.first_client_s
    raw = {
        "wall_s": t.wall_s,
        "client_compute_s": t.client_compute_s,
        "busy_s": t.busy_s,
        "startup_s": t.first_client_s,
        "client_calls": len(t.intervals),
        "framework_s": t.wall_s - t.busy_s,
        "framework_fraction_after_startup": (after - t.busy_s) / after,
        "per_round_framework_s_after_startup": (after - t.busy_s) / rounds,
        "client_calls_s": [[round(a, 2), round(b, 2)] for a, b in t.intervals],
    }
    return Outcome(
        key="framework_overhead_fraction",
        value=(t.wall_s - t.busy_s) / t.wall_s,
        target="<= 0.10",
        note=f"share of the wall time of a {rounds}-round demo simulation (3 hospitals, DP, "
        "feature cache) in which no site computes, Ray's start-up included; without the "
        "start-up (until the first client call) in raw",
        settings={"preset": "demo", "hospitals": HOSPITALS, "rounds": rounds, "data_scale": scale},
        raw=raw,
        extra={},
    )
