"""DP overhead: samples/s of one local epoch without DP divided by the same with DP-SGD.

Same model, trainable set, batch size and data; Opacus `hooks` and `ghost` modes; `tiny`, `demo`
and `seed` (random-init BERT-base); with the frozen-feature cache (the default recipe) and
without it. The key is the default recipe: demo preset, cache on, hooks.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.record import Outcome
from benchmarks.workloads import bench_config, best_epoch, demo_hospitals, load_site

MODES = ("hooks", "ghost")


def _cases(quick: bool) -> list[tuple[str, bool]]:
    """(preset, feature cache) pairs; the seed preset without the cache only in a full run."""
    cases = [("tiny", True), ("tiny", False), ("demo", True), ("demo", False), ("seed", True)]
    return cases if quick else [*cases, ("seed", False)]


def run(quick: bool, work: Path) -> Outcome:
    """Measure every case; the key is demo / cache on / hooks."""
    scale = 0.5 if quick else 1.0
    data_root = demo_hospitals(work / "data", 1, size_scale=scale)[0]
    seed_root = demo_hospitals(work / "data-seed", 1, size_scale=0.1 if quick else 0.3)[0]
    repeats = 2 if quick else 3
    rows = []
    for preset, cache in _cases(quick):
        folder = seed_root if preset == "seed" else data_root
        # a cached epoch takes tens of milliseconds: time more of them, more often, against noise
        base = dict(
            local_epochs=3 if cache else 1, local_steps=0, feature_cache=cache
        )  # passes, not steps
        tries = 3 * repeats if cache else repeats
        plain_run = bench_config(preset, dp=False, **base)
        site = load_site(folder, work / "state")
        data = site.data(plain_run)
        plain = best_epoch(plain_run, site, dp=False, repeats=tries)
        for mode in MODES:
            dp_run = bench_config(preset, grad_sample_mode=mode, **base)
            private = best_epoch(dp_run, site, dp=True, repeats=tries)
            rows.append(
                {
                    "preset": preset,
                    "feature_cache": cache,
                    "mode": mode,
                    "examples": len(data.train),
                    "batch_size": dp_run.train.batch_size,
                    "non_dp_samples_per_s": plain.samples_per_s,
                    "dp_samples_per_s": private.samples_per_s,
                    "ratio": plain.samples_per_s / private.samples_per_s,
                }
            )
    key = next(
        r for r in rows if (r["preset"], r["feature_cache"], r["mode"]) == ("demo", True, "hooks")
    )
    return Outcome(
        key="dp_overhead_ratio",
        value=key["ratio"],
        target="<= 1.2",
        note="non-DP samples/s over DP-SGD samples/s of local training (best of repeats; with the "
        "cache 3 epochs per call, 3x the repeats), demo "
        "preset, default trainable set (fusion + head), feature cache on, Opacus hooks",
        settings={
            "presets": sorted({r["preset"] for r in rows}),
            "modes": list(MODES),
            "repeats": repeats,
            "data_scale": scale,
            "local_epochs": "1 (cache off), 3 (cache on)",
        },
        raw={"cases": rows},
    )
