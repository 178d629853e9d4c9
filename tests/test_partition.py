"""`fedfusion data partition`: patients stay whole, seeds reproduce, output is a simulation root."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from client.site_config import SiteConfig
from common.data.manifest import ManifestError, read_manifest
from common.data.tabular import parse_tabular_fields
from simulations.demo_data import DEMO_CLASS_NAMES, DEMO_TABULAR_FIELDS
from simulations.partition import PartitionError, PartitionPlan, partition_manifest
from tests.conftest import tiny_run
from tools.cli import main

# its module-scoped fixture is built once: every test of the module on one xdist worker
pytestmark = pytest.mark.xdist_group("test_partition")

CLASSES = tuple(DEMO_CLASS_NAMES)


@pytest.fixture(scope="module")
def pooled(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo hospitals pooled in one manifest with a `site` column (paths to the demo images)."""
    folder = tmp_path_factory.mktemp("pooled")
    rows = []
    for i in range(3):
        with (demo_root / f"hospital-{i}" / "manifest.csv").open(newline="") as fh:
            for row in csv.DictReader(fh):
                image = demo_root / f"hospital-{i}" / row["image"]
                rows.append({**row, "image": str(image), "site": f"site-{'abc'[i]}"})
    path = folder / "pooled.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def hospital_rows(out: Path, n: int) -> list[list[dict[str, str]]]:
    return [
        list(csv.DictReader((out / f"hospital-{i}" / "manifest.csv").open(newline="")))
        for i in range(n)
    ]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "size", "natural"])
def test_every_patient_in_exactly_one_hospital(pooled: Path, tmp_path: Path, scheme: str) -> None:
    source = list(csv.DictReader(pooled.open(newline="")))
    partition_manifest(pooled, tmp_path / "out", PartitionPlan(3, scheme, alpha=0.3), CLASSES)
    hospitals = hospital_rows(tmp_path / "out", 3)
    patients = [{r["patient_id"] for r in rows} for rows in hospitals]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not patients[i] & patients[j], f"a patient in hospitals {i} and {j}"
    assert set().union(*patients) == {r["patient_id"] for r in source}
    # every pooled row is in its patient's hospital, once
    key = ("text", "label", "patient_id")
    assert Counter(tuple(r[k] for k in key) for rows in hospitals for r in rows) == Counter(
        tuple(r[k] for k in key) for r in source
    )
    if scheme == "size":
        sizes = [len(p) for p in patients]
        assert sizes[0] < sizes[1] < sizes[2]
    if scheme == "natural":
        assert [{r["site"] for r in rows} for rows in hospitals] == [
            {"site-a"},
            {"site-b"},
            {"site-c"},
        ]


def test_same_seed_same_partition(pooled: Path, tmp_path: Path) -> None:
    def files(name: str, seed: int, scheme: str) -> list[str]:
        partition_manifest(pooled, tmp_path / name, PartitionPlan(3, scheme, seed=seed), CLASSES)
        return [(tmp_path / name / f"hospital-{i}" / "manifest.csv").read_text() for i in range(3)]

    for scheme in ("iid", "dirichlet"):
        assert files(f"{scheme}-a", 5, scheme) == files(f"{scheme}-b", 5, scheme)
        assert files(f"{scheme}-c", 6, scheme) != files(f"{scheme}-a2", 5, scheme)


def test_dirichlet_skews_labels_more_than_iid(pooled: Path, tmp_path: Path) -> None:
    def spread(scheme: str) -> float:
        partition_manifest(
            pooled, tmp_path / scheme, PartitionPlan(3, scheme, alpha=0.1, seed=1), CLASSES
        )
        shares = []
        for rows in hospital_rows(tmp_path / scheme, 3):
            counts = Counter(r["label"] for r in rows)
            shares.append([counts[c] / len(rows) for c in CLASSES])
        return max(max(s[c] for s in shares) - min(s[c] for s in shares) for c in range(3))

    assert spread("dirichlet") > spread("iid") + 0.1


def test_output_is_a_simulation_data_root_with_dropped_modalities(
    pooled: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "data",
            "partition",
            str(pooled),
            str(out),
            "--hospitals",
            "3",
            "--scheme",
            "iid",
            "--drop-text",
            "1",
            "--drop-images",
            "2",
            "--class-names",
            ",".join(CLASSES),
        ]
    )
    assert code == 0
    run = tiny_run(out)
    for i in range(3):
        site = SiteConfig.from_node_config({"partition-id": i}, run)  # as the simulation maps it
        _, rows = read_manifest(site.manifest, CLASSES)
        assert all(
            r.image is None or r.image.is_file() for r in rows
        )  # paths rewritten, resolvable
        assert (all(r.text for r in rows), all(r.image for r in rows)) == (i != 1, i != 2)
    first = (out / "hospital-0" / "manifest.csv").read_text().splitlines()[1]
    assert first.startswith("../../")  # relative to the new manifest, not copied


def test_refusals(pooled: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(PartitionError, match="not an empty folder"):
        partition_manifest(pooled, tmp_path / "full", PartitionPlan(2), CLASSES)
    with pytest.raises(PartitionError, match="lose every modality"):
        partition_manifest(
            pooled, tmp_path / "a", PartitionPlan(2, drop_text=(1,), drop_images=(1,)), CLASSES
        )
    with pytest.raises(PartitionError, match="pass --hospitals 3"):
        partition_manifest(pooled, tmp_path / "b", PartitionPlan(2, "natural"), CLASSES)
    with pytest.raises(PartitionError, match=r"numbered 0..1"):
        partition_manifest(pooled, tmp_path / "c", PartitionPlan(2, drop_text=(2,)), CLASSES)
    assert main(["data", "partition", str(pooled), str(tmp_path / "full")]) == 2


def test_structured_fields_are_checked_kept_and_dropped_per_hospital(
    pooled: Path, tmp_path: Path
) -> None:
    """With the run's schema, a hospital without images and reports keeps its rows that hold a
    field (a tabular-only site), one in --drop-fields loses the fields' cells, and a cell outside
    the schema stops the partition before anything is written."""
    fields = parse_tabular_fields(DEMO_TABULAR_FIELDS)
    names = [f.name for f in fields]
    plan = PartitionPlan(3, drop_text=(1,), drop_images=(1,), drop_fields=(2,))
    summaries = partition_manifest(pooled, tmp_path / "out", plan, CLASSES, fields)
    full, tabular_only, no_fields = hospital_rows(tmp_path / "out", 3)
    assert any(r[n] for r in full for n in names)
    assert tabular_only and all(not r["image"] and not r["text"] for r in tabular_only)
    assert all(any(r[n] for n in names) for r in tabular_only)  # a row with no field is dropped
    source_rows = {r["patient_id"] for r in csv.DictReader(pooled.open(newline=""))}
    kept = [r["patient_id"] for rows in (full, tabular_only, no_fields) for r in rows]
    assert set(kept) <= source_rows
    assert summaries[1].rows_with_fields == len(tabular_only) and summaries[1].rows_with_text == 0
    assert all(not r[n] for r in no_fields for n in names) and summaries[2].rows_with_fields == 0
    _, rows = read_manifest(tmp_path / "out" / "hospital-1", CLASSES, fields=fields)
    assert len(rows) == len(tabular_only)  # a site of a three-modality run reads them

    with pytest.raises(PartitionError, match="needs the structured fields"):
        partition_manifest(pooled, tmp_path / "a", PartitionPlan(3, drop_fields=(0,)), CLASSES)
    narrow = parse_tabular_fields("age:numeric:0:30")  # most demo ages are outside it
    with pytest.raises(ManifestError, match="age"):
        partition_manifest(pooled, tmp_path / "b", PartitionPlan(3), CLASSES, narrow)
    assert not (tmp_path / "b").exists()
