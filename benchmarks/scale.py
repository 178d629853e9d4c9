"""Scale: simulations of 10, 50 and 100 hospitals (`tiny` preset, 1 round): wall time, peak memory.

Peak memory is the summed resident memory of the driver and every process under it (Ray's GCS,
raylet and workers), sampled twice a second: an upper bound, since pages the processes share
(the torch library in every worker) count once per process. `--quick` runs 10 and 100 only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from benchmarks.record import Outcome
from benchmarks.simulation import timed_simulation
from benchmarks.workloads import demo_hospitals
from common.config import default_user_config

log = logging.getLogger(__name__)
SIZES = (10, 50, 100)


def run(quick: bool, work: Path) -> Outcome:
    """One 1-round simulation per size; the key is the largest size that completed."""
    demo_hospitals(work / "data", max(SIZES), size_scale=0.05)  # 15 to 36 cases per hospital
    rows, done = [], 0
    for n in (SIZES[0], SIZES[-1]) if quick else SIZES:  # each start of Ray costs about 30 s here
        config = {**default_user_config(), "preset": "tiny", "data-root": str(work / "data"),
                  "state-root": str(work / f"state-{n}"), "output-dir": str(work / "outputs"),
                  "num-server-rounds": 1, "min-nodes": n}
        try:
            t = timed_simulation(config, n, work)
        except Exception as err:  # noqa: BLE001 - recorded and logged: this size is not reached
            log.warning("simulation of %d hospitals failed: %s", n, err)
            rows.append({"hospitals": n, "error": f"{type(err).__name__}: {err}"})
            break
        summaries = sorted((work / "outputs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
        completed = bool(summaries) and '"completed"' in summaries[-1].read_text()
        rows.append({"hospitals": n, "wall_s": t.wall_s, "startup_s": t.first_client_s,
                     "client_calls": len(t.intervals), "peak_rss_mib": t.peak_rss_bytes / 2**20,
                     "completed": completed})
        if not completed:
            break
        done = n
    return Outcome(
        key="max_hospitals_simulated", value=float(done), target=">= 100",
        note="largest simulated federation (tiny preset, 1 round, DP, evaluation on) that completed",
        settings={"sizes": [r["hospitals"] for r in rows], "preset": "tiny", "rounds": 1, "data_scale": 0.05},
        raw={"runs": rows})
