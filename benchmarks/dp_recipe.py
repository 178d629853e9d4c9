"""The DP recipe at every site size: local steps and batch, fixed or chosen by the site's rule.

Two tables, test AUROC at epsilon 8 per hospital (mean over `seeds` patient-level splits of
`benchmarks.small_hospitals`: a fifth of the patients held out as the common test set):

- **natural hospitals** (medpix-dev's 5 when present, and 5 small demo hospitals of 20 to 100
  rows): fixed local steps K and batch B, the recipe's two levers;
- **site sizes**: two hospitals of n rows each (n = 20, 50, 100, 300, 700, drawn from the pooled
  training patients), the fixed recipe against the site-adaptive rule (`max-noise-ratio`,
  `common.privacy.recipe`), with the steps each site chose (from the run's history).

Each setting is one run of the ServerApp and the hospitals' ClientApps in this process
(`benchmarks.federation`), on cached frozen features (`benchmarks.small_hospitals`).
"""

from __future__ import annotations

import csv
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.federation import Hospitals, site_states, test_probabilities
from benchmarks.record import Outcome
from benchmarks.small_hospitals import (
    DEMO_CLASSES,
    MEDPIX,
    MEDPIX_CLASSES,
    Case,
    PooledFeatures,
    Split,
    ci95,
    demo_cases,
    medpix_cases,
    split,
    write_site,
)
from benchmarks.workloads import bench_user_config
from common import protocol as R
from common.config import RunConfig
from common.runfolder import RunFolder
from common.training.metrics import classification_metrics

log = logging.getLogger(__name__)

STEPS = (5, 20, 40)
BATCHES = (32, 128)
SIZES = (20, 50, 100, 300, 700)
RULE = {"max-noise-ratio": 0.05, "max-batch-size": 128}  # the site-adaptive recipe's setting


class Bench:
    """One dataset's pooled features and splits; `auroc` runs one setting on one split."""

    def __init__(self, cases: list[Case], work: Path, classes: str, preset: str) -> None:
        self.cases, self.work, self.classes, self.preset = cases, work, classes, preset
        pool_run = RunConfig.from_user_config(self.config(dp=False))
        pool = site_states(work / "state" / "pool", [write_site(work / "pool", cases)])[0]
        self.features = PooledFeatures(pool, pool_run)
        self._splits: dict[int, Split] = {}

    def split(self, seed: int) -> Split:
        """Split `seed`'s folders, written once."""
        if seed not in self._splits:
            self._splits[seed] = split(self.cases, self.work / f"seed-{seed}", seed)
        return self._splits[seed]

    def config(self, *, dp: bool = True, **overrides: Any) -> dict[str, Any]:
        """The run config of a setting (epsilon 8 per hospital)."""
        return bench_user_config(
            self.preset, class_names=self.classes, dp=dp, target_epsilon=8.0, **overrides
        )

    def auroc(
        self, seed: int, name: str, paths: list[Path], user_config: dict[str, Any]
    ) -> tuple[float, list[float]]:
        """Test AUROC of one setting on split `seed`, and the sampling rate each site took."""
        test_site = site_states(self.work / f"seed-{seed}" / "state", [self.split(seed).test])[0]
        hospitals = Hospitals(self.work / f"seed-{seed}" / "federation")
        run = RunConfig.from_user_config(user_config)
        for p in paths:
            site_run, site = hospitals.warm(p, user_config)
            self.features.prime(site, site_run)
        self.features.prime(test_site, run, split_name="test")
        state = hospitals.federate(user_config, paths, name)
        probs, labels = test_probabilities(run, test_site, state)
        first = RunFolder(hospitals.root / "runs" / name).read_history()[0]
        rates = [float((site.train or {}).get(R.SAMPLE_RATE, 0)) for site in first.sites.values()]
        return classification_metrics(labels, probs, 0.0).auroc, rates

    def natural(
        self, seeds: int, steps: tuple[int, ...] = STEPS, batches: tuple[int, ...] = BATCHES
    ) -> dict[str, Any]:
        """Fixed steps x batch, and the rule, on the dataset's own hospitals."""
        per: dict[str, list[float]] = defaultdict(list)
        for seed in range(seeds):
            hospitals = self.split(seed).hospitals
            settings = {
                f"k{k}-b{b}": {"local_steps": k, "batch_size": b} for k in steps for b in batches
            }
            settings["rule"] = RULE  # on the defaults (20 steps from batch 32)
            for name, changes in settings.items():
                config = self.config(**changes)
                per[name].append(self.auroc(seed, name, hospitals, config)[0])
                log.info("natural seed %d %s: %.3f", seed, name, per[name][-1])
        return {k: ci95(v) for k, v in per.items()}

    def sizes(self, seeds: int, sizes: tuple[int, ...]) -> dict[str, Any]:
        """Two hospitals of n rows each: the fixed recipe and the rule, AUROC and chosen rates."""
        out: dict[str, Any] = {}
        for n in sizes:
            per: dict[str, list[float]] = defaultdict(list)
            chosen: list[float] = []
            for seed in range(seeds):
                paths = self._two_sites(seed, n)
                if not paths:
                    continue
                for name, changes in (("fixed", {}), ("rule", RULE)):
                    value, rates = self.auroc(seed, f"n{n}-{name}", paths, self.config(**changes))
                    per[name].append(value)
                    if name == "rule":
                        chosen += rates
            if per:
                out[str(n)] = {
                    **{k: ci95(v) for k, v in per.items()},
                    "rule_rates": sorted({round(r, 4) for r in chosen}),
                }
        return out

    def _two_sites(self, seed: int, n: int) -> list[Path]:
        """Two hospitals of `n` training patients' rows each (none of the split's test patients)."""
        with (self.split(seed).test / "manifest.csv").open(newline="", encoding="utf-8") as fh:
            held = {r["patient_id"] for r in csv.DictReader(fh)}
        train = [c for c in self.cases if c.patient not in held]
        if len(train) < 2 * n:
            log.warning("%d training rows: too few for two sites of %d", len(train), n)
            return []
        random.Random(seed).shuffle(train)
        root = self.work / f"seed-{seed}" / f"size-{n}"
        return [write_site(root / f"site-{i}", train[i * n : (i + 1) * n]) for i in range(2)]


def run(
    quick: bool,
    work: Path,
    *,
    preset: str = "demo",
    seeds: int = 3,
    demo_seeds: int | None = None,
    medpix: Path = MEDPIX,
    sizes: tuple[int, ...] = SIZES,
    steps: tuple[int, ...] = STEPS,
    batches: tuple[int, ...] = BATCHES,
) -> Outcome:
    """Both tables; the headline: the small demo hospitals' best fixed setting minus the default.

    `demo_seeds` (None: `seeds`, or 10 without `quick`): the small demo hospitals' splits, whose
    runs take seconds; their DP noise alone moves a setting's AUROC by several hundredths.
    """
    if demo_seeds is None:
        demo_seeds = seeds if quick else max(seeds, 10)
    results: dict[str, Any] = {}
    demo = Bench(demo_cases(work / "demo-data", 0.12), work / "demo", DEMO_CLASSES, preset)
    results["demo_small"] = {"natural": demo.natural(demo_seeds, steps, batches)}
    if medpix.is_file():
        mp = Bench(medpix_cases(medpix), work / "medpix", MEDPIX_CLASSES, preset)
        results["medpix"] = {
            "natural": mp.natural(seeds, steps, batches),
            "sizes": mp.sizes(seeds, sizes),
        }
    else:
        results["demo_small"]["sizes"] = demo.sizes(demo_seeds, tuple(n for n in sizes if n <= 100))
    print(table(results), flush=True)
    natural = results["demo_small"]["natural"]
    default = natural["k20-b32"]["mean"]
    best = max(natural, key=lambda k: natural[k]["mean"])
    extra = {
        f"dp_recipe_rule_gain_{data}": (
            r["natural"]["rule"]["mean"] - r["natural"]["k20-b32"]["mean"],
            ">= 0",
        )
        for data, r in results.items()
    }
    return Outcome(
        key="dp_recipe_best_gain_demo_small",
        value=natural[best]["mean"] - default,
        target=">= 0",
        note=f"small demo hospitals, epsilon 8, {demo_seeds} seeds: the best setting ({best}) "
        "minus the default (20 steps, batch 32); both tables in raw",
        settings={
            "preset": preset,
            "seeds": seeds,
            "demo_seeds": demo_seeds,
            "steps": steps,
            "batches": batches,
            "rule": RULE,
        },
        raw=results,
        extra=extra,
    )


def table(results: dict[str, Any]) -> str:
    """Mean test AUROC [95% CI] per setting; per size, the rule's chosen sampling rates."""
    lines = []
    for data, r in results.items():
        lines.append(f"{data}: natural hospitals, steps x batch and the rule, AUROC at epsilon 8")
        for name, v in r["natural"].items():
            lines.append(f"  {name:<10} {v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")
        if "sizes" in r:
            lines.append(f"{data}: two sites of n rows, the defaults vs the rule ({RULE})")
            for n, v in r["sizes"].items():
                fixed, rule = v.get("fixed", {}), v.get("rule", {})
                lines.append(
                    f"  n={n:<5} fixed {fixed.get('mean', np.nan):.3f}  "
                    f"rule {rule.get('mean', np.nan):.3f}  sampling rates {v['rule_rates']}"
                )
    return "\n".join(lines)
