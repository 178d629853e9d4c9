"""Utility: AUROC and accuracy on one common held-out test set, for centralized training (with
and without DP), federated training (without DP, and with DP at epsilon 1, 3, 8) and each
hospital alone (mean over hospitals), on non-IID demo hospitals.

Data: demo hospitals are pooled; a fifth of the patients is held out as the common test set; the
rest is split into hospitals with Flower Datasets' DirichletPartitioner over the label (alpha
0.5: label skew and, through it, size skew). Every setting is one run of the ServerApp and the
hospitals' ClientApps (`benchmarks.federation`: the coordinator's round loop with its update
screening, weight cap and each round's evaluation; the site's own round with its feature cache,
DP-SGD and ledger) for the same rounds and local steps, from the same initial model.
Centralized training is one site holding all training data. The runs are in this process, not
under Ray (the framework's cost is the framework benchmark's subject, not this one's).
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset as HFDataset
from flwr_datasets.partitioner import DirichletPartitioner

from benchmarks.federation import Hospitals, site_states, test_probabilities
from benchmarks.record import Outcome
from benchmarks.workloads import bench_user_config, demo_hospitals
from client.state import SiteState
from common.config import RunConfig
from common.data.manifest import Row, read_manifest
from common.training.metrics import classification_metrics

CLASSES = ("normal", "pneumonia", "effusion")
HOSPITALS, ALPHA, TEST_FRACTION = 5, 0.5, 0.2
EPSILONS = (1.0, 3.0, 8.0)
State = dict[str, torch.Tensor]


def pooled_rows(folders: list[Path]) -> list[Row]:
    """Every demo hospital's rows, patient ids made unique across hospitals."""
    rows = []
    for folder in folders:
        _, found = read_manifest(folder, CLASSES)
        rows += [
            Row(r.line, r.image, r.text, r.label, f"{folder.name}/{r.patient_id}", None)
            for r in found
        ]
    return rows


def write_manifest(folder: Path, rows: list[Row]) -> Path:
    """A site manifest of `rows` (image paths relative to it; every row in the train split)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "text", "label", "patient_id", "split"])
        for r in rows:
            image = os.path.relpath(r.image, folder) if r.image else ""
            writer.writerow([image, r.text, r.label, r.patient_id, "train"])
    return path


def dirichlet_split(rows: list[Row], n: int, seed: int) -> list[list[Row]]:
    """Label-skewed hospitals (Flower Datasets' DirichletPartitioner, alpha = ALPHA)."""
    partitioner = DirichletPartitioner(
        num_partitions=n,
        partition_by="label",
        alpha=ALPHA,
        min_partition_size=20,
        self_balancing=False,
        seed=seed,
    )
    partitioner.dataset = HFDataset.from_dict(
        {"label": [r.label for r in rows], "row": list(range(len(rows)))}
    )
    return [[rows[i] for i in partitioner.load_partition(p)["row"]] for p in range(n)]


def prepare(work: Path, scale: float) -> tuple[list[Path], Path, Path, dict[str, object]]:
    """Hospital folders, the centralized folder, the test folder, and the split's description."""
    rows = pooled_rows(demo_hospitals(work / "pool", 6, size_scale=scale))
    patients = sorted({r.patient_id for r in rows})
    random.Random(0).shuffle(patients)
    test_patients = set(patients[: round(TEST_FRACTION * len(patients))])
    test = [r for r in rows if r.patient_id in test_patients]
    train = [r for r in rows if r.patient_id not in test_patients]
    parts = dirichlet_split(train, HOSPITALS, seed=0)
    folders = [
        write_manifest(work / "sites" / f"hospital-{i}", p).parent for i, p in enumerate(parts)
    ]
    central = write_manifest(work / "central", train).parent
    test_folder = write_manifest(work / "test", test).parent
    counts = {
        f"hospital-{i}": {c: sum(r.label == c for r in p) for c in CLASSES}
        for i, p in enumerate(parts)
    }
    return (
        folders,
        central,
        test_folder,
        {"train": len(train), "test": len(test), "hospitals": counts},
    )


def test_metrics(run: RunConfig, test_site: SiteState, state: State) -> dict[str, float]:
    """AUROC and accuracy of `state` on the common test set (its frozen outputs cached)."""
    probs, labels = test_probabilities(run, test_site, state)
    m = classification_metrics(labels, probs, 0.0)
    return {"auroc": m.auroc, "accuracy": m.accuracy}


def run(quick: bool, work: Path) -> Outcome:
    """Every setting; keys: fed DP8 vs centralized (gap), fed DP8 vs local-only (gain)."""
    scale, rounds = (0.4, 3) if quick else (1.0, 5)
    return measure_settings(work, preset="demo", scale=scale, rounds=rounds)


def measure_settings(
    work: Path, *, preset: str, scale: float, rounds: int, overrides: dict[str, Any] | None = None
) -> Outcome:
    """Every setting on demo hospitals of `scale`, `rounds` rounds of the `preset` model.

    `overrides`: further run-config keys for every setting (the smoke test's cheaper recipe).
    """
    folders, central, test_folder, split = prepare(work, scale)
    # the hospitals and the centralized site stay warm across settings (each its own run and
    # budget): their frozen features are computed once
    hospitals = Hospitals(work / "federation")
    test_site = site_states(work / "state", [test_folder])[0]

    def config(dp: bool, eps: float = 8.0) -> dict[str, Any]:
        return bench_user_config(
            preset, **(overrides or {}), num_server_rounds=rounds, dp=dp, target_epsilon=eps
        )

    results: dict[str, dict[str, float]] = {}

    def measure(name: str, user_config: dict[str, Any], paths: list[Path]) -> dict[str, float]:
        state = hospitals.federate(user_config, paths, name)
        return test_metrics(RunConfig.from_user_config(user_config), test_site, state)

    results["central"] = measure("central", config(False), [central])
    results["central-dp8"] = measure("central-dp8", config(True), [central])
    results["federated"] = measure("federated", config(False), folders)
    for eps in EPSILONS:
        results[f"federated-dp{eps:g}"] = measure(
            f"federated-dp{eps:g}", config(True, eps), folders
        )
    local = [measure(f"local-{p.name}", config(False), [p]) for p in folders]
    results["local-mean"] = {
        k: float(np.mean([m[k] for m in local])) for k in ("auroc", "accuracy")
    }
    results["local-per-hospital"] = {
        p.name: m["auroc"] for p, m in zip(folders, local, strict=True)
    }
    gap = results["central"]["auroc"] - results["federated-dp8"]["auroc"]
    gain = results["federated-dp8"]["auroc"] - results["local-mean"]["auroc"]
    return Outcome(
        key="auroc_gap_fed_dp8_vs_central",
        value=gap,
        target="<= 0.02",
        note="test AUROC of centralized training without DP minus federated training with DP at "
        "epsilon 8 per hospital; gain: federated DP8 minus the mean of hospitals trained alone "
        "(without DP: alone, a hospital's data never leaves it)",
        settings={
            "preset": preset,
            "rounds": rounds,
            "local_epochs": config(False)["local-epochs"],
            "local_steps": config(False)["local-steps"],
            "hospitals": HOSPITALS,
            "dirichlet_alpha": ALPHA,
            "data_scale": scale,
            "partitioner": "flwr_datasets DirichletPartitioner(partition_by='label')",
            "split": split,
        },
        raw=results,
        extra={"auroc_gain_fed_vs_local": (gain, ">= 0.05")},
    )
