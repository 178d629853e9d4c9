"""Trainable sets under DP on real hospitals: fusion + head, the top text layer, LoRA adapters.

medpix-dev's 5 natural hospitals (small demo hospitals when it is absent), the patient-level splits
of `benchmarks.small_hospitals` (a fifth of the patients held out as the common test set), federated
DP-SGD at epsilon 8 per hospital with the run config's recipe, each federation one run of the
ServerApp and the hospitals' ClientApps in this process (`benchmarks.federation`); for each
trainable set the mean test AUROC over the seeds with its 95% interval, the bytes a site sends a
round and the seconds a federation takes (the whole run: the coordinator's model, checkpoints,
evaluation requests).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.federation import Hospitals, initial_state, site_states, test_probabilities
from benchmarks.record import Outcome
from benchmarks.small_hospitals import (
    DEMO_CLASSES,
    MEDPIX,
    MEDPIX_CLASSES,
    Case,
    PooledFeatures,
    ci95,
    demo_cases,
    medpix_cases,
    split,
    write_site,
)
from benchmarks.traffic import payload_bytes
from benchmarks.workloads import bench_user_config
from common.config import RunConfig
from common.training.metrics import classification_metrics

log = logging.getLogger(__name__)

# name -> run-config overrides (the rest: the defaults)
OPTIONS: dict[str, dict[str, Any]] = {
    "fusion+head": {},
    "top-text-layer": {"trainable-text-layers": 1},
    "lora-r8-top-layer": {"lora-rank": 8, "lora-layers": 1},
}


def measure(
    work: Path,
    cases: list[Case],
    *,
    classes: str,
    preset: str = "demo",
    seeds: int = 3,
    options: dict[str, dict[str, Any]] = OPTIONS,
    overrides: dict[str, Any] | None = None,
    first_seed: int = 0,
) -> dict[str, Any]:
    """Per option: test AUROC over `seeds` splits from `first_seed`, bytes sent, federation time."""
    pool_folder = write_site(work / "pool", cases)
    splits = {
        seed: split(cases, work / f"seed-{seed}", seed)
        for seed in range(first_seed, first_seed + seeds)
    }
    results: dict[str, Any] = {}
    for name, option in options.items():
        user_config = bench_user_config(
            preset,
            class_names=classes,
            dp=True,
            target_epsilon=8.0,
            **{**(overrides or {}), **option},
        )
        run = RunConfig.from_user_config(user_config)
        pool = site_states(work / "state" / name / "pool", [pool_folder])[0]
        features = PooledFeatures(pool, run)  # the frozen front below this option's trainable part
        start = initial_state(run)
        values, seconds = [], []
        for seed, s in splits.items():
            hospitals = Hospitals(work / "federation" / name / f"seed-{seed}")
            test_site = site_states(work / "state" / name / f"seed-{seed}", [s.test])[0]
            for p in s.hospitals:
                site_run, site = hospitals.warm(p, user_config)
                features.prime(site, site_run)
            features.prime(test_site, run, split_name="test")
            begin = time.perf_counter()
            state = hospitals.federate(user_config, s.hospitals, f"{name}-seed{seed}")
            seconds.append(time.perf_counter() - begin)
            probs, labels = test_probabilities(run, test_site, state)
            values.append(classification_metrics(labels, probs, 0.0).auroc)
            log.info("%s seed %d: test AUROC %.3f in %.0f s", name, seed, values[-1], seconds[-1])
        results[name] = {
            **ci95(values),
            "update_bytes": payload_bytes(start, np.dtype("float32")),
            "trainable_parameters": sum(v.numel() for v in start.values()),
            "federation_s": float(np.mean(seconds)),
            "overrides": option,
        }
    return results


def table(results: dict[str, Any]) -> str:
    """One line per trainable set."""
    lines = ["trainable set        test AUROC [95% CI]     update      s/federation"]
    for name, r in results.items():
        lo, hi = r["ci95"]
        lines.append(
            f"{name:<20} {r['mean']:.3f} [{lo:.3f}, {hi:.3f}]  {r['update_bytes'] / 1e3:7.0f} kB"
            f"  {r['federation_s']:8.0f}"
        )
    return "\n".join(lines)


def run(
    quick: bool,
    work: Path,
    *,
    medpix: Path = MEDPIX,
    preset: str = "demo",
    seeds: int = 3,
    demo_scale: float = 0.12,
    overrides: dict[str, Any] | None = None,
) -> Outcome:
    """medpix-dev (small demo hospitals if absent): LoRA's mean test AUROC minus fusion + head's."""
    if medpix.is_file():
        data, cases, classes = "medpix-dev", medpix_cases(medpix), MEDPIX_CLASSES
    else:
        data, classes = "demo_small", DEMO_CLASSES
        cases = demo_cases(work / "demo-data", demo_scale)
        print(
            f"trainable_sets: medpix-dev not found at {medpix}: small demo hospitals instead",
            flush=True,
        )
    # quick: one seed, and not the top layer in full (a LoRA federation on medpix-dev: ~6 min here)
    seeds = 1 if quick else seeds
    options = {k: v for k, v in OPTIONS.items() if k != "top-text-layer"} if quick else OPTIONS
    results = measure(
        work / data,
        cases,
        classes=classes,
        preset=preset,
        seeds=seeds,
        options=options,
        overrides=overrides,
    )
    print(table(results), flush=True)
    m = {k: v["mean"] for k, v in results.items()}
    return Outcome(
        key="lora_gain_fed_dp8",
        value=m["lora-r8-top-layer"] - m["fusion+head"],
        target=">= 0",
        note=f"{data}: mean test AUROC over {seeds} seeds of federated DP-SGD (epsilon 8 per "
        "hospital) with LoRA rank 8 on the top text layer minus that of fusion + head alone; the "
        "top text layer trained in full in raw",
        settings={
            "data": data,
            "preset": preset,
            "seeds": seeds,
            "options": options,
            "overrides": overrides or {},
        },
        raw=results,
    )
