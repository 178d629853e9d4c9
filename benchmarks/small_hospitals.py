"""Small hospitals: test AUROC on real, small, uneven hospitals (medpix-dev) and on small demo ones.

For each of `seeds` patient-level splits: a fifth of the patients is held out as the common test
set (no hospital trains or validates on it); every other patient stays at their hospital
(medpix-dev: the 5 natural hospitals of its `site` column, 58-217 patients each; demo: 5 demo
hospitals of 20-100 rows). Settings, all from the same initial model, each one run of the
ServerApp and the hospitals' ClientApps in this process (`benchmarks.federation`: the run
config's recipe and strategy, the coordinator's screening, weight cap and evaluation):
centralized without DP (one site holding every training row), federated without DP and with DP
at epsilon 1, 3, 8 per hospital, each hospital alone (without DP and with DP at epsilon 8), and
the reference: a linear probe (scikit-learn logistic regression, centralized, no DP) on the same
frozen features, mean-pooled (the image tokens; the text tokens over the report's real tokens),
standardised.

Each value is the mean test AUROC over the seeds with a 95% confidence interval (Student t over
the seeds). The frozen features of every row are computed once per dataset (a frozen encoder
gives a row the same features at any site) and handed to each site's feature cache, so every
setting trains on cached features as a site does after its first round.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from benchmarks.federation import Hospitals, site_states, test_probabilities
from benchmarks.record import Outcome
from benchmarks.workloads import bench_config, bench_user_config
from client.rounds import _cache_key
from client.state import SiteState
from common.config import RunConfig
from common.data.tabular import TABULAR_KEYS
from common.model.feature_cache import (
    CachedFusion,
    FeatureSet,
    image_rest,
    text_rest,
)
from common.model.fusion import Features
from common.training.metrics import classification_metrics
from simulations.demo_data import write_demo_hospitals

log = logging.getLogger(__name__)

MEDPIX = Path(__file__).resolve().parents[2] / "shared" / "data" / "medpix-dev" / "manifest.csv"
MEDPIX_CLASSES = "other,neoplasm"
DEMO_CLASSES = "normal,pneumonia,effusion"
TEST_FRACTION = 0.2
EPSILONS = (1.0, 3.0, 8.0)
CASE_COLUMNS = ("image", "text", "label", "patient_id", "split")  # a demo manifest's own columns
Key = tuple[str, str, str]  # (image path, text, patient): a row's identity across manifests


@dataclass(frozen=True, kw_only=True)
class Case:
    """One pooled row and the hospital it came from."""

    image: str  # absolute path, or ""
    text: str
    label: str
    patient: str
    hospital: str
    fields: tuple[tuple[str, str], ...] = ()  # structured fields (name, raw cell), if any

    @property
    def key(self) -> Key:
        """The row's identity in any manifest written from it."""
        return (self.image, self.text, self.patient)


def medpix_cases(manifest: Path) -> list[Case]:
    """medpix-dev's rows; hospital = the `site` column (body region)."""
    with manifest.open(newline="", encoding="utf-8") as fh:
        return [
            Case(
                image=str((manifest.parent / r["image"]).resolve()) if r["image"] else "",
                text=r["text"],
                label=r["label"],
                patient=r["patient_id"],
                hospital=r["site"],
            )
            for r in csv.DictReader(fh)
        ]


def demo_cases(root: Path, scale: float) -> list[Case]:
    """Small demo hospitals (`scale` of the demo sizes); hospital = the demo hospital."""
    if not (root / "hospital-4" / "manifest.csv").is_file():
        write_demo_hospitals(root, 5, seed=0, size_scale=scale)
    cases = []
    for folder in sorted(root.glob("hospital-*")):
        with (folder / "manifest.csv").open(newline="", encoding="utf-8") as fh:
            cases += [
                Case(
                    image=str((folder / r["image"]).resolve()) if r["image"] else "",
                    text=r["text"],
                    label=r["label"],
                    patient=f"{folder.name}/{r['patient_id']}",
                    hospital=folder.name,
                    fields=tuple((k, r[k]) for k in r if k not in CASE_COLUMNS),
                )
                for r in csv.DictReader(fh)
            ]
    return cases


def write_site(folder: Path, cases: list[Case]) -> Path:
    """A site manifest of `cases`, all rows in the training split (the site keeps no validation)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        names = [name for name, _ in cases[0].fields] if cases else []
        writer.writerow(["image", "text", "label", "patient_id", "split", *names])
        for c in cases:
            writer.writerow(
                [
                    os.path.relpath(c.image, folder) if c.image else "",
                    c.text,
                    c.label,
                    c.patient,
                    "train",
                    *(value for _, value in c.fields),
                ]
            )
    return folder


@dataclass(frozen=True, kw_only=True)
class Split:
    """One seed's folders: hospitals, the centralized site, the common test set."""

    hospitals: list[Path]
    central: Path
    test: Path
    sizes: dict[str, int]  # training rows per hospital
    test_rows: int


def split(cases: list[Case], work: Path, seed: int) -> Split:
    """Hold out a fifth of the patients (seeded); the rest stay at their hospitals."""
    patients = sorted({c.patient for c in cases})
    random.Random(seed).shuffle(patients)
    held = set(patients[: round(TEST_FRACTION * len(patients))])
    test = [c for c in cases if c.patient in held]
    train = [c for c in cases if c.patient not in held]
    by_hospital: dict[str, list[Case]] = defaultdict(list)
    for c in train:
        by_hospital[c.hospital].append(c)
    names = sorted(by_hospital)
    hospitals = [write_site(work / f"hospital-{i}", by_hospital[n]) for i, n in enumerate(names)]
    return Split(
        hospitals=hospitals,
        central=write_site(work / "central", train),
        test=write_site(work / "test", test),
        test_rows=len(test),
        sizes={f"hospital-{i} ({n})": len(by_hospital[n]) for i, n in enumerate(names)},
    )


class PooledFeatures:
    """Frozen features of every pooled row, computed once; any site's cache is filled from them."""

    def __init__(self, pool: SiteState, run: RunConfig) -> None:
        bundle, data = pool.bundle(run.model), pool.data(run)
        self.features = pool.features.get(
            _cache_key(run, bundle, data), bundle.model, data.train, torch.device("cpu")
        )
        self.index = {_row_key(r): i for i, r in enumerate(data.train.rows)}

    def of(self, site: SiteState, run: RunConfig) -> FeatureSet:
        """The frozen features of this site's training rows, in its order (what a miss computes)."""
        rows = [self.index[_row_key(r)] for r in site.data(run).train.rows]
        # a pool read with structured fields also serves a run without them (same frozen fronts)
        keys = [k for k in self.features.tensors if run.model.tabular or k not in TABULAR_KEYS]
        return FeatureSet({k: self.features.tensors[k][rows] for k in keys})

    def prime(self, site: SiteState, run: RunConfig, *, split_name: str = "train") -> None:
        """Put this site's rows' features into its cache under the key its rounds look up."""
        bundle, data = site.bundle(run.model), site.data(run)
        key = replace(_cache_key(run, bundle, data), split=split_name)
        site.features._sets[key] = self.of(site, run)  # a cache fill, exactly what a miss computes

    def pooled(self, site: SiteState, run: RunConfig) -> tuple[np.ndarray, np.ndarray]:
        """A site's mean-pooled frozen features (N, D_image + D_text) and labels (the probe's)."""
        bundle, data = site.bundle(run.model), site.data(run)
        rows = torch.tensor([self.index[_row_key(r)] for r in data.train.rows])
        net, t = CachedFusion(bundle.model), self.features.tensors
        mask = t["attention_mask"][rows]
        bundle.model.eval()
        with torch.no_grad():  # the encoders' outputs as the fusion layer sees them, mean-pooled
            f = Features(
                image_rest(net.model, t["image_front"][rows], net.image_start),
                text_rest(net.model, t["text_front"][rows], mask, net.text_start),
                mask.bool(),
                t["has_image"][rows],
                t["has_text"][rows],
            )
            image_vec, text_vec = f.pooled()
        return torch.cat([image_vec, text_vec], dim=1).numpy(), t["labels"][rows].numpy()


def _row_key(row: Any) -> Key:
    return (str(Path(row.image).resolve()) if row.image else "", row.text, row.patient_id)


def probe_auroc(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Test AUROC of a standardised logistic regression (macro one-vs-rest beyond 2 classes)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    probe.fit(x_train, y_train)
    probs = probe.predict_proba(x_test)
    if probs.shape[1] == 2:
        return float(roc_auc_score(y_test, probs[:, 1]))
    return float(roc_auc_score(y_test, probs, multi_class="ovr", average="macro"))


def ci95(values: list[float]) -> dict[str, Any]:
    """Mean and 95% confidence interval (Student t over the seeds)."""
    a = np.asarray(values, dtype=float)
    mean = float(a.mean())
    half = (
        float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
        if len(a) > 1
        else math.nan
    )
    return {"mean": mean, "ci95": [mean - half, mean + half], "values": [float(v) for v in a]}


def measure_dataset(
    cases: list[Case],
    work: Path,
    *,
    classes: str,
    seeds: int,
    overrides: dict[str, Any],
    preset: str,
) -> dict[str, Any]:
    """Every setting over `seeds` splits of `cases`; per setting: mean, CI, values."""

    def config(dp: bool, eps: float = 8.0) -> dict[str, Any]:
        return bench_user_config(
            preset, class_names=classes, dp=dp, target_epsilon=eps, **overrides
        )

    run0 = RunConfig.from_user_config(config(False))
    pool_folder = write_site(work / "pool", cases)
    pool = site_states(work / "state" / "pool", [pool_folder])[0]
    features = PooledFeatures(pool, run0)
    per: dict[str, list[float]] = defaultdict(list)
    splits = []
    for seed in range(seeds):
        s = split(cases, work / f"seed-{seed}", seed)
        splits.append({"hospital_rows": s.sizes, "test_rows": s.test_rows})
        hospitals = Hospitals(work / f"seed-{seed}" / "federation")
        test_site = site_states(work / f"seed-{seed}" / "state", [s.test])[0]

        def auroc(
            name: str,
            user_config: dict[str, Any],
            paths: list[Path],
            hospitals: Hospitals = hospitals,
            test_site: SiteState = test_site,
            seed: int = seed,
        ) -> float:
            run = RunConfig.from_user_config(user_config)
            for p in paths:  # (a site rebuilds its model, and empties its cache, when the model
                site_run, site = hospitals.warm(p, user_config)  # config changes)
                features.prime(site, site_run)
            features.prime(test_site, run, split_name="test")
            state = hospitals.federate(user_config, paths, name)
            probs, labels = test_probabilities(run, test_site, state)
            value = classification_metrics(labels, probs, 0.0).auroc
            log.info("seed %d %s: test AUROC %.3f", seed, name, value)
            return value

        per["central"].append(auroc("central", config(False), [s.central]))
        per["federated"].append(auroc("federated", config(False), s.hospitals))
        for eps in EPSILONS:
            per[f"federated-dp{eps:g}"].append(
                auroc(f"federated-dp{eps:g}", config(True, eps), s.hospitals)
            )
        alone = [auroc(f"alone-{p.name}", config(False), [p]) for p in s.hospitals]
        alone_dp = [auroc(f"alone-dp8-{p.name}", config(True), [p]) for p in s.hospitals]
        per["single-hospital"].append(float(np.mean(alone)))
        per["single-hospital-dp8"].append(float(np.mean(alone_dp)))
        for p, a, b in zip(s.hospitals, alone, alone_dp, strict=True):
            per[f"alone-{p.name}"].append(a)
            per[f"alone-dp8-{p.name}"].append(b)
        x_tr, y_tr = features.pooled(hospitals.warm(s.central, config(False))[1], run0)
        x_te, y_te = features.pooled(test_site, run0)
        per["linear-probe"].append(probe_auroc(x_tr, y_tr, x_te, y_te))
    return {"settings": {k: ci95(v) for k, v in per.items()}, "splits": splits}


def summary_keys(prefix: str, result: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """The issue's targets as summary keys: fed DP8 against the probe, single hospitals, central."""
    m = {k: v["mean"] for k, v in result["settings"].items()}
    probe, single = m["linear-probe"], m["single-hospital-dp8"]
    return {
        f"{prefix}_auroc_fed_dp8": (m["federated-dp8"], f">= {probe - 0.05:.3f}"),
        f"{prefix}_auroc_probe": (probe, ">= 0"),
        f"{prefix}_gain_fed_dp8_vs_single_dp8": (m["federated-dp8"] - single, ">= 0.05"),
        f"{prefix}_gap_central_vs_fed": (m["central"] - m["federated"], "<= 0.02"),
    }


def run(
    quick: bool,
    work: Path,
    *,
    preset: str = "demo",
    seeds: int = 3,
    demo_scale: float = 0.12,
    medpix: Path = MEDPIX,
    overrides: dict[str, Any] | None = None,
) -> Outcome:
    """medpix-dev (when present) and small demo hospitals; the headline: medpix fed DP8 AUROC."""
    overrides = dict(overrides or {})
    results: dict[str, Any] = {}
    extra: dict[str, tuple[float, str]] = {}
    notes = []
    if medpix.is_file():
        results["medpix"] = measure_dataset(
            medpix_cases(medpix),
            work / "medpix",
            classes=MEDPIX_CLASSES,
            seeds=seeds,
            overrides=overrides,
            preset=preset,
        )
        extra.update(summary_keys("medpix", results["medpix"]))
    else:
        notes.append(
            f"medpix-dev not found at {medpix}: skipped (only the demo hospitals measured)"
        )
        print(f"small_hospitals: {notes[-1]}", flush=True)
    results["demo_small"] = measure_dataset(
        demo_cases(work / "demo-data", demo_scale),
        work / "demo",
        classes=DEMO_CLASSES,
        seeds=seeds,
        overrides=overrides,
        preset=preset,
    )
    extra.update(summary_keys("demo_small", results["demo_small"]))
    head = "medpix_auroc_fed_dp8" if "medpix" in results else "demo_small_auroc_fed_dp8"
    value, target = extra.pop(head)
    print(table(results), flush=True)
    return Outcome(
        key=head,
        value=value,
        target=target,
        note="mean test AUROC over seeds of federated DP-SGD at epsilon 8 per hospital; target: "
        "the centralized no-DP linear probe on the same frozen features minus 0.05. "
        + "; ".join(notes),
        settings={
            "preset": preset,
            "seeds": seeds,
            "test_fraction": TEST_FRACTION,
            "demo_scale": demo_scale,
            "overrides": overrides,
            "recipe": _recipe(bench_config(preset, **overrides)),
        },
        raw=results,
        extra=extra,
    )


def _recipe(run: RunConfig) -> dict[str, Any]:
    t, a = run.train, run.aggregation
    return {
        "rounds": run.federation.num_server_rounds,
        "local_steps": t.local_steps,
        "local_epochs": t.local_epochs,
        "batch_size": t.batch_size,
        "learning_rate": t.learning_rate,
        "momentum": t.momentum,
        "strategy": a.strategy,
        "server_learning_rate": a.server_learning_rate,
        "server_momentum": a.server_momentum,
        "max_text_length": run.model.max_text_length,
        "fusion_dim": run.model.fusion_dim,
        "max_grad_norm": run.privacy.max_grad_norm,
    }


def table(results: dict[str, Any]) -> str:
    """Mean test AUROC [95% CI] per setting and dataset."""
    lines = []
    for name, r in results.items():
        lines.append(f"{name}: setting, mean test AUROC [95% CI] over seeds")
        for setting, v in r["settings"].items():
            if setting.startswith("alone-"):
                continue
            lo, hi = v["ci95"]
            lines.append(f"  {setting:<22}{v['mean']:.3f} [{lo:.3f}, {hi:.3f}]")
    return "\n".join(lines)
