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
RULE_RATIO = 0.05  # the rule's bound in the sizes table (the run config's default is 0: off)


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
    ) -> tuple[float, list[int]]:
        """Test AUROC of one setting on split `seed`, and the steps per round each site took."""
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
        steps = [int((site.train or {}).get(R.STEPS, 0)) for site in first.sites.values()]
        return classification_metrics(labels, probs, 0.0).auroc, steps

    def natural(self, seeds: int) -> dict[str, Any]:
        """Fixed steps x batch on the dataset's own hospitals."""
        per: dict[str, list[float]] = defaultdict(list)
        for seed in range(seeds):
            hospitals = self.split(seed).hospitals
            for k in STEPS:
                for b in BATCHES:
                    name = f"k{k}-b{b}"
                    config = self.config(local_steps=k, batch_size=b)
                    per[name].append(self.auroc(seed, name, hospitals, config)[0])
                    log.info("natural seed %d %s: %.3f", seed, name, per[name][-1])
        return {k: ci95(v) for k, v in per.items()}

    def sizes(self, seeds: int, sizes: tuple[int, ...]) -> dict[str, Any]:
        """Two hospitals of n rows each: the fixed recipe and the rule, AUROC and chosen steps."""
        out: dict[str, Any] = {}
        for n in sizes:
            per: dict[str, list[float]] = defaultdict(list)
            chosen: list[int] = []
            for seed in range(seeds):
                paths = self._two_sites(seed, n)
                if not paths:
                    continue
                for name, ratio in (("fixed", 0.0), ("rule", RULE_RATIO)):
                    config = self.config(**{"max-noise-ratio": ratio})
                    value, steps = self.auroc(seed, f"n{n}-{name}", paths, config)
                    per[name].append(value)
                    if name == "rule":
                        chosen += steps
            if per:
                out[str(n)] = {
                    **{k: ci95(v) for k, v in per.items()},
                    "rule_steps": sorted(set(chosen)),
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
    medpix: Path = MEDPIX,
    sizes: tuple[int, ...] = SIZES,
) -> Outcome:
    """Both tables; the headline: the small demo hospitals' best fixed setting minus the default."""
    results: dict[str, Any] = {}
    demo = Bench(demo_cases(work / "demo-data", 0.12), work / "demo", DEMO_CLASSES, preset)
    results["demo_small"] = {"natural": demo.natural(seeds)}
    if medpix.is_file():
        mp = Bench(medpix_cases(medpix), work / "medpix", MEDPIX_CLASSES, preset)
        results["medpix"] = {"natural": mp.natural(seeds), "sizes": mp.sizes(seeds, sizes)}
    else:
        results["demo_small"]["sizes"] = demo.sizes(seeds, tuple(n for n in sizes if n <= 100))
    print(table(results), flush=True)
    natural = results["demo_small"]["natural"]
    default = natural["k20-b32"]["mean"]
    best = max(natural, key=lambda k: natural[k]["mean"])
    return Outcome(
        key="dp_recipe_best_gain_demo_small",
        value=natural[best]["mean"] - default,
        target=">= 0",
        note=f"small demo hospitals, epsilon 8, {seeds} seeds: the best fixed setting ({best}) "
        "minus the default (20 steps, batch 32); both tables in raw",
        settings={"preset": preset, "seeds": seeds, "steps": STEPS, "batches": BATCHES},
        raw=results,
    )


def table(results: dict[str, Any]) -> str:
    """Mean test AUROC [95% CI] per setting; per size, the rule's chosen steps."""
    lines = []
    for data, r in results.items():
        lines.append(f"{data}: natural hospitals, steps x batch, test AUROC at epsilon 8")
        for name, v in r["natural"].items():
            lines.append(f"  {name:<10} {v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")
        if "sizes" in r:
            lines.append(f"{data}: two sites of n rows, fixed (20 steps) vs rule ({RULE_RATIO})")
            for n, v in r["sizes"].items():
                fixed, rule = v.get("fixed", {}), v.get("rule", {})
                lines.append(
                    f"  n={n:<5} fixed {fixed.get('mean', np.nan):.3f}  "
                    f"rule {rule.get('mean', np.nan):.3f}  steps {v['rule_steps']}"
                )
    return "\n".join(lines)
