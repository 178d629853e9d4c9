"""Scale: simulations of 10, 100 and 1,000 hospitals (`tiny` preset): time per round, peak memory.

Each round samples at most `SAMPLED` sites to train and as many to evaluate (`fraction-train`,
`fraction-evaluate`, Flower's sampling), as cross-device studies do; a worker process keeps at
most `client.state.MAX_WARM_SITES` sites warm and drops the least recently used, so memory does
not grow with the federation. Peak memory is sampled twice a second over the driver and every
process under it (Ray's GCS, raylet and workers): summed (an upper bound, since pages the
processes share, the torch library in every worker, count once per process) and the largest one.
`--quick` runs 1,000 hospitals for 1 round; the full run 10, 100 and 1,000, 2 rounds each.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.record import Outcome
from benchmarks.simulation import timed_simulation
from benchmarks.workloads import demo_hospitals
from common.config import default_user_config

log = logging.getLogger(__name__)
SIZES = (10, 100, 1000)
SAMPLED = 100  # sites asked to train (and to evaluate) per round, at most
DATA_SCALE = 0.05  # 15 to 36 cases per hospital


def sampling(hospitals: int) -> tuple[float, int, int]:
    """(fraction of sites sampled per round, sites sampled, min-nodes) for a federation size."""
    fraction = min(1.0, SAMPLED / hospitals)
    sampled = max(1, int(hospitals * fraction))
    return fraction, sampled, max(1, math.ceil(sampled / 2))  # a round needs half of them


def measure(work: Path, sizes: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    """One simulation per size, smallest first, until one does not complete."""
    demo_hospitals(work / "data", max(sizes), size_scale=DATA_SCALE)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        fraction, sampled, min_nodes = sampling(n)
        config = {
            **default_user_config(),
            "preset": "tiny",
            "data-root": str(work / "data"),
            "state-root": str(work / f"state-{n}"),
            "output-dir": str(work / "outputs"),
            "run-name": f"scale-{n}",
            "num-server-rounds": rounds,
            "min-nodes": min_nodes,
            "fraction-train": fraction,
            "fraction-evaluate": fraction,
        }
        try:
            t = timed_simulation(config, n, work)
        except Exception as err:  # recorded and logged: this size is not reached
            log.warning("simulation of %d hospitals failed: %s", n, err)
            rows.append({"hospitals": n, "error": f"{type(err).__name__}: {err}"})
            break
        summary = work / "outputs" / f"scale-{n}" / "summary.json"
        completed = summary.is_file() and '"completed"' in summary.read_text()
        rows.append(
            {
                "hospitals": n,
                "sampled_per_round": sampled,
                "rounds": rounds,
                "wall_s": t.wall_s,
                "startup_s": t.first_client_s,
                "per_round_s": (t.wall_s - t.first_client_s) / rounds,
                "client_calls": len(t.intervals),
                "peak_rss_mib": t.peak_rss_bytes / 2**20,
                "peak_largest_process_rss_mib": t.peak_largest_rss_bytes / 2**20,
                "completed": completed,
            }
        )
        log.info("scale: %s", rows[-1])
        if not completed:
            break
    return rows


def run(quick: bool, work: Path) -> Outcome:
    """The key is the largest size that completed."""
    sizes, rounds = ((1000,), 1) if quick else (SIZES, 2)
    rows = measure(work, sizes, rounds)
    done = max((r["hospitals"] for r in rows if r.get("completed")), default=0)
    return Outcome(
        key="max_hospitals_simulated",
        value=float(done),
        target=">= 1000",
        note=f"largest simulated federation (tiny preset, DP, evaluation on, at most {SAMPLED} "
        "sites sampled per round) that completed",
        settings={
            "sizes": list(sizes),
            "preset": "tiny",
            "rounds": rounds,
            "data_scale": DATA_SCALE,
            "sampled_per_round_max": SAMPLED,
        },
        raw={"runs": rows},
    )
