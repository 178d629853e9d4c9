"""Structured fields as a third modality: medpix-dev with and without them, federated under DP.

medpix-dev's 5 natural hospitals and the patient-level splits of `benchmarks.small_hospitals` (a
fifth of the patients held out as the common test set), federated DP-SGD at epsilon 8 per hospital
(`benchmarks.federation`), the same seeds and splits for both settings: image + report, and image
+ report + the cases' structured fields from `meta.csv` (age, sex, modality, plane, body
location; a sex left blank and a rare plane are missing cells). For the three-modality model the
test set is also scored with the fields masked and with the fields only (the ablation: what the
fields add to the same model). Without medpix-dev, the small demo hospitals and their fields.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.federation import Hospitals, site_states
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
from benchmarks.workloads import bench_user_config
from common.config import RunConfig
from common.model.feature_cache import CachedFusion, CacheKey, FeatureSet
from common.model.fusion_model import FusionModel
from common.model.trainable import load_trainable_state
from common.training.loop import predict_logits
from common.training.metrics import classification_metrics
from simulations.demo_data import DEMO_TABULAR_FIELDS

log = logging.getLogger(__name__)

PLANES = ("Axial", "Coronal", "Sagittal")  # 94% of the images; any other plane: missing
VIEWS = ("all", "without-fields", "fields-only")


def medpix_fields(meta: Path, cases: list[Case]) -> tuple[list[Case], str]:
    """The cases with their meta.csv fields, and the schema (`tabular-fields`) declaring them."""
    with meta.open(newline="", encoding="utf-8") as fh:
        by_image = {str((meta.parent / r["image"]).resolve()): r for r in csv.DictReader(fh)}
    locations = sorted({r["location"] for r in by_image.values() if r["location"]})
    schema = (
        "age:numeric:0:110;sex:categorical:female|male;modality:categorical:CT|MR;"
        f"plane:categorical:{'|'.join(PLANES)};location:categorical:{'|'.join(locations)}"
    )
    out = []
    for c in cases:
        r = by_image[c.image]
        fields = {
            "age": r["age"],
            "sex": r["sex"],
            "modality": r["modality"],
            "plane": r["plane"] if r["plane"] in PLANES else "",
            "location": r["location"],
        }
        out.append(dataclasses.replace(c, fields=tuple(fields.items())))
    return out, schema


def test_views(
    run: RunConfig, test_site: Any, state: dict[str, torch.Tensor]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Probabilities and labels on the test rows, with every modality, the fields masked and the
    fields only (the last two: three-modality models only)."""
    bundle, data = test_site.bundle(run.model), test_site.data(run)
    model: FusionModel = bundle.model
    load_trainable_state(model, state)
    key = CacheKey.for_model(
        run.model, dataset_sha256=data.version, split="test", frozen_fingerprint=bundle.fingerprint
    )
    features = test_site.features.get(key, model, data.train, torch.device("cpu"))
    t = features.tensors
    sets = {"all": features}
    if "has_tabular" in t:
        none = torch.zeros_like(t["has_tabular"])
        sets["without-fields"] = FeatureSet({**t, "has_tabular": none})
        sets["fields-only"] = FeatureSet({**t, "has_image": none, "has_text": none})
    out = {}
    for name, fs in sets.items():
        logits, labels = predict_logits(
            CachedFusion(model), DataLoader(fs, batch_size=256), torch.device("cpu")
        )
        out[name] = (torch.softmax(logits, dim=-1).numpy(), labels.numpy())
    return out


def measure(
    work: Path,
    cases: list[Case],
    *,
    classes: str,
    schema: str,
    preset: str,
    seeds: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per setting (two / three modalities): test AUROC per view over `seeds` splits."""
    pool_folder = write_site(work / "pool", cases)
    splits = {seed: split(cases, work / f"seed-{seed}", seed) for seed in range(seeds)}
    configs = {
        name: bench_user_config(
            preset,
            class_names=classes,
            dp=True,
            target_epsilon=8.0,
            **{**(overrides or {}), "tabular-fields": fields},
        )
        for name, fields in (("two-modalities", ""), ("three-modalities", schema))
    }
    # the frozen fronts (and the fields' inputs), computed once for both settings
    pool = site_states(work / "state" / "pool", [pool_folder])[0]
    features = PooledFeatures(pool, RunConfig.from_user_config(configs["three-modalities"]))
    results: dict[str, Any] = {}
    for name, user_config in configs.items():
        run = RunConfig.from_user_config(user_config)
        aurocs: dict[str, list[float]] = {}
        for seed, s in splits.items():
            hospitals = Hospitals(work / "federation" / name / f"seed-{seed}")
            test_site = site_states(work / "state" / name / f"seed-{seed}", [s.test])[0]
            for p in s.hospitals:
                site_run, site = hospitals.warm(p, user_config)
                features.prime(site, site_run)
            features.prime(test_site, run, split_name="test")
            state = hospitals.federate(user_config, s.hospitals, f"{name}-seed{seed}")
            for view, (probs, labels) in test_views(run, test_site, state).items():
                auroc = classification_metrics(labels, probs, 0.0).auroc
                aurocs.setdefault(view, []).append(auroc)
                log.info("%s seed %d %s: test AUROC %.3f", name, seed, view, auroc)
        results[name] = {view: {**ci95(v), "values": v} for view, v in aurocs.items()}
    return results


def table(results: dict[str, Any]) -> str:
    """One line per setting and view."""
    lines = ["setting            view             test AUROC [95% CI]"]
    for name, views in results.items():
        for view, r in views.items():
            lo, hi = r["ci95"]
            lines.append(f"{name:<18} {view:<16} {r['mean']:.3f} [{lo:.3f}, {hi:.3f}]")
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
    """medpix-dev (small demo hospitals if absent): test AUROC with the fields minus without."""
    if medpix.is_file():
        data, classes = "medpix-dev", MEDPIX_CLASSES
        cases, schema = medpix_fields(medpix.parent / "meta.csv", medpix_cases(medpix))
    else:
        data, classes, schema = "demo_small", DEMO_CLASSES, DEMO_TABULAR_FIELDS
        cases = demo_cases(work / "demo-data", demo_scale)
        print(f"tabular_fields: medpix-dev not found at {medpix}: demo hospitals", flush=True)
    seeds = 1 if quick else seeds
    results = measure(
        work / data,
        cases,
        classes=classes,
        schema=schema,
        preset=preset,
        seeds=seeds,
        overrides=overrides,
    )
    print(table(results), flush=True)
    three, two = results["three-modalities"], results["two-modalities"]
    low = two["all"]["ci95"][0]  # one seed has no interval: its mean, then
    low = low if math.isfinite(low) else two["all"]["mean"]
    return Outcome(
        key="medpix_auroc_fed_dp8_three_modalities",
        value=three["all"]["mean"],
        # issue 27: three modalities must not lose beyond the two-modality model's interval
        target=f">= {low:.4f}",
        note=f"{data}: mean test AUROC over {seeds} seeds of federated DP-SGD (epsilon 8 per "
        "hospital) with image, report and structured fields; the target is the low end of "
        "the two-modality model's 95% interval on the same splits and epsilon (its mean with one "
        "seed; mean "
        f"{two['all']['mean']:.4f}); raw holds both and the ablation of the three-modality "
        "one (fields masked, fields only)",
        settings={"data": data, "preset": preset, "seeds": seeds, "tabular-fields": schema},
        raw=results,
    )
