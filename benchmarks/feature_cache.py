"""Cached frozen features: local epoch time without the cache over the time with it (demo preset).

Also: the one-off cost of filling the cache, the speedup of a whole run of rounds, the memory
the cached tokens take per example, and writing / reading them on disk (safetensors).
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.record import Outcome
from benchmarks.workloads import (
    bench_config,
    best_epoch,
    demo_hospitals,
    load_site,
    local_epoch,
)
from common.model.feature_cache import load_features, save_features

ROUNDS, EPOCHS = 3, 2  # the default run: 3 rounds of 2 local epochs


def run(quick: bool, work: Path) -> Outcome:
    """Default recipe (DP-SGD, hooks, batch 64, fusion + head trainable), with and without cache."""
    scale = 0.5 if quick else 1.0
    folder = demo_hospitals(work / "data", 1, size_scale=scale)[0]
    repeats = 2 if quick else 3
    off_run = bench_config("demo", local_epochs=1, local_steps=0, feature_cache=False)  # one pass
    on_run = bench_config("demo", local_epochs=1, local_steps=0, feature_cache=True)
    site = load_site(folder, work / "state")
    data = site.data(on_run)
    off = best_epoch(off_run, site, dp=True, repeats=repeats)
    site.features.clear()
    first = local_epoch(on_run, site, dp=True)  # fills the cache
    warm = best_epoch(on_run, site, dp=True, repeats=3 * repeats)  # tens of ms: more tries
    fill = first.wall_seconds - first.seconds
    features = site.features.only()
    start = time.perf_counter()
    save_features(features, work / "features.safetensors")
    saved = time.perf_counter() - start
    start = time.perf_counter()
    load_features(work / "features.safetensors")
    loaded = time.perf_counter() - start
    per_example = {k: v[0].numel() * v.element_size() for k, v in features.tensors.items()}
    run_off = ROUNDS * EPOCHS * off.seconds / off.examples
    run_on = (fill + ROUNDS * EPOCHS * warm.seconds) / warm.examples
    return Outcome(
        key="feature_cache_speedup",
        value=off.seconds / off.examples / (warm.seconds / warm.examples),
        target=">= 3",
        note="seconds per example of one DP-SGD local epoch without the cache over the same with a "
        "warm cache (demo preset, default trainable set; best of repeats). The cache's one-off "
        "fill and a whole default run are in raw.",
        settings={
            "preset": "demo",
            "examples": len(data.train),
            "data_scale": scale,
            "repeats": repeats,
            "dp": True,
            "grad_sample_mode": "hooks",
        },
        raw={
            "epoch_without_cache_s": off.seconds,
            "epoch_with_cache_s": warm.seconds,
            "examples_without": off.examples,
            "examples_with": warm.examples,
            "cache_fill_s": fill,
            "fill_per_example_ms": 1000 * fill / len(data.train),
            f"run_speedup_{ROUNDS}_rounds_x_{EPOCHS}_epochs_incl_fill": run_off / run_on,
            "cache_bytes": features.nbytes,
            "cache_bytes_per_example": features.nbytes / len(features),
            "bytes_per_example_by_tensor": per_example,
            "disk_write_s": saved,
            "disk_read_s": loaded,
            "disk_file_bytes": (work / "features.safetensors").stat().st_size,
        },
    )
