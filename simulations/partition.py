"""Splitting one pooled manifest into simulated hospitals with Flower Datasets' partitioners.

Every patient lands in exactly one hospital: the partitioners see a table with ONE ROW PER
PATIENT (label = the patient's most frequent label; ties go to the earlier class name), and
each hospital gets all the rows of its patients. Schemes:
- `iid`: patients shuffled (seeded), then equal shares (`IidPartitioner`);
- `dirichlet`: label skew, class proportions per hospital drawn from Dirichlet(alpha)
  (`DirichletPartitioner`, Hsu et al. 2019); smaller alpha, more skew;
- `size`: size skew, hospital i holds a share proportional to exp(i) (`ExponentialPartitioner`);
- `natural`: one hospital per value of a manifest column, e.g. the site that contributed the row
  (`NaturalIdPartitioner`; hospitals ordered by the sorted values).

Output: `<out>/hospital-<i>/manifest.csv`, the format `fedfusion simulate --data-root <out>`
reads. Images are not copied: each image path is rewritten relative to the new manifest, so a
partition of a large pooled dataset costs no disk space and the pooled files stay the single
copy. Keep the output folder and the pooled images where they are (or move them together).
A hospital in `drop_text` / `drop_images` / `drop_fields` gets its rows without reports /
images / structured fields; a row left with no modality (no image, no report and none of the
declared fields) is dropped (and counted). The declared fields (`fields`, the run config's
`tabular-fields`) are checked in every row before anything is written; undeclared columns are
copied as they are.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.data.manifest import REQUIRED_COLUMNS, Row, raw_records, read_manifest
from common.data.tabular import TabularField
from common.errors import ConfigurationError

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "size", "natural")
MIN_PATIENTS = 2  # per hospital: a site needs a training and a validation patient


class PartitionError(ConfigurationError):
    """Pooled manifest cannot be partitioned as asked; the message says why and what to change."""


@dataclass(frozen=True)
class PartitionPlan:
    """How to split: the scheme and its knobs, and which hospitals lose a modality."""

    hospitals: int
    scheme: str = "iid"
    alpha: float = 0.5  # dirichlet concentration
    column: str = "site"  # natural: the column naming each row's origin
    seed: int = 0
    drop_text: tuple[int, ...] = ()
    drop_images: tuple[int, ...] = ()
    drop_fields: tuple[int, ...] = ()  # hospitals without the structured fields


@dataclass(frozen=True)
class HospitalSummary:
    """What one hospital received."""

    name: str
    patients: int
    rows: int
    labels: dict[str, int]
    rows_with_image: int
    rows_with_text: int
    dropped_rows: int  # rows left empty by a dropped modality
    origin: str  # natural: the column value; otherwise ""
    rows_with_fields: int = 0  # rows with at least one declared structured field


def partition_manifest(
    source: Path,
    out: Path,
    plan: PartitionPlan,
    class_names: tuple[str, ...],
    fields: tuple[TabularField, ...] = (),
) -> list[HospitalSummary]:
    """Write `<out>/hospital-<i>/manifest.csv` per hospital of the plan (same seed, same output);
    `fields`: the run's structured fields (a row holding only fields is kept)."""
    _check_plan(plan, out, fields)
    if importlib.util.find_spec("flwr_datasets") is None:
        raise PartitionError(
            "partitioning needs Flower Datasets, which a hospital node does not "
            'install: pip install -e ".[partition]" (or flwr-datasets).'
        )
    # every row valid (its fields too) before anything is written
    manifest, rows = read_manifest(source, class_names, fields=fields)
    records = [rec for _, rec in raw_records(manifest)]
    patients, table = _patient_table(manifest, rows, records, plan, class_names)
    groups, origins = _assign(table, plan)
    columns = [*REQUIRED_COLUMNS, *[c for c in _columns(records) if c not in REQUIRED_COLUMNS]]
    names = tuple(f.name for f in fields)
    summaries = []
    for i, group in enumerate(groups):
        folder = out / f"hospital-{i}"
        folder.mkdir(parents=True)
        chosen = [j for p in group for j in patients[p]]
        written, dropped = _write_hospital(
            folder,
            manifest,
            [records[j] for j in sorted(chosen)],
            columns,
            declared=() if i in plan.drop_fields else names,
            dropped_fields=names if i in plan.drop_fields else (),
            drop_text=i in plan.drop_text,
            drop_images=i in plan.drop_images,
        )
        summaries.append(
            HospitalSummary(
                folder.name,
                len(group),
                len(written),
                dict(Counter(r["label"] for r in written)),
                sum(bool(r["image"]) for r in written),
                sum(bool(r["text"]) for r in written),
                dropped,
                origins[i],
                sum(any(r.get(name, "").strip() for name in names) for r in written),
            )
        )
    return summaries


def _check_plan(plan: PartitionPlan, out: Path, fields: tuple[TabularField, ...]) -> None:
    if plan.scheme not in SCHEMES:
        raise PartitionError(f"unknown scheme {plan.scheme!r}; use one of {list(SCHEMES)}.")
    if plan.hospitals < 1:
        raise PartitionError(f"--hospitals must be at least 1, got {plan.hospitals}.")
    if plan.alpha <= 0:
        raise PartitionError(f"--alpha must be positive, got {plan.alpha}.")
    for option, indices in (
        ("--drop-text", plan.drop_text),
        ("--drop-images", plan.drop_images),
        ("--drop-fields", plan.drop_fields),
    ):
        if bad := [i for i in indices if not 0 <= i < plan.hospitals]:
            raise PartitionError(
                f"{option} names hospital(s) {bad}, but hospitals are numbered "
                f"0..{plan.hospitals - 1}."
            )
    if plan.drop_fields and not fields:
        raise PartitionError(
            "--drop-fields needs the structured fields' schema (--tabular-fields): without "
            "one, no column is a structured field."
        )
    kept_fields = set(range(plan.hospitals)) - set(plan.drop_fields) if fields else set()
    if none := sorted((set(plan.drop_text) & set(plan.drop_images)) - kept_fields):
        raise PartitionError(
            f"hospital(s) {none} would lose every modality (text, images"
            + (" and structured fields" if fields else "")
            + "); drop fewer."
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PartitionError(
            f"{out} exists and is not an empty folder; choose a new output folder "
            "(a partition never overwrites one)."
        )


def _columns(records: list[dict[str, str]]) -> list[str]:
    """Every column of the records, in order of first appearance."""
    return list(dict.fromkeys(k for rec in records for k in rec))


def _patient_table(
    manifest: Path,
    rows: list[Row],
    records: list[dict[str, str]],
    plan: PartitionPlan,
    class_names: tuple[str, ...],
) -> tuple[dict[str, list[int]], Dataset]:
    """Row indices per patient, and a `datasets.Dataset` with one row per patient."""
    from datasets import Dataset

    patients: dict[str, list[int]] = {}
    for j, row in enumerate(rows):
        patients.setdefault(row.patient_id, []).append(j)
    ids, labels, origins = [], [], []
    for patient, members in patients.items():
        counts = Counter(rows[j].label for j in members)
        labels.append(max(class_names, key=lambda c: (counts[c], -class_names.index(c))))
        ids.append(patient)
        if plan.scheme == "natural":
            origins.append(_origin(manifest, rows, records, members, plan.column))
    data = {"patient": ids, "label": labels}
    if plan.scheme == "natural":
        data["origin"] = origins
    return patients, Dataset.from_dict(data)


def _origin(
    manifest: Path, rows: list[Row], records: list[dict[str, str]], members: list[int], column: str
) -> str:
    """The patient's value of the natural column; all their rows must agree."""
    values = {records[j].get(column, "").strip() for j in members}
    if len(values) != 1 or "" in values:
        line = rows[members[0]].line
        raise PartitionError(
            f"{manifest}:{line}: patient {rows[members[0]].patient_id!r} has column {column!r} "
            f"values {sorted(values)}; --scheme natural needs one non-empty value per patient."
        )
    return values.pop()


def _assign(table: Dataset, plan: PartitionPlan) -> tuple[list[list[str]], list[str]]:
    """Patient ids per hospital (and, for `natural`, each hospital's column value)."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        ExponentialPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    n, shuffled = plan.hospitals, table.shuffle(seed=plan.seed)
    if plan.scheme == "natural":
        partitioner = NaturalIdPartitioner(partition_by="origin")
        partitioner.dataset = table
        if partitioner.num_partitions != n:  # (this also builds the id -> value map)
            values = partitioner.partition_id_to_natural_id
            raise PartitionError(
                f"column {plan.column!r} has {len(values)} distinct values "
                f"({sorted(values.values())}); pass --hospitals {len(values)}."
            )
        values = partitioner.partition_id_to_natural_id
    elif plan.scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=plan.alpha,
            min_partition_size=MIN_PATIENTS,
            seed=plan.seed,
        )
        partitioner.dataset = table
    else:
        partitioner = IidPartitioner(n) if plan.scheme == "iid" else ExponentialPartitioner(n)
        partitioner.dataset = shuffled  # these two cut contiguous ranges: shuffle first
    try:
        groups = [list(partitioner.load_partition(i)["patient"]) for i in range(n)]
    except ValueError as err:
        raise PartitionError(
            f"Flower Datasets could not make {n} {plan.scheme} hospitals from "
            f"{len(table)} patients ({err}). Use fewer hospitals, a larger "
            "--alpha, or more data."
        ) from err
    if small := [i for i, g in enumerate(groups) if len(g) < MIN_PATIENTS]:
        raise PartitionError(
            f"hospital(s) {small} would hold fewer than {MIN_PATIENTS} patients "
            f"({[len(g) for g in groups]} patients per hospital). Use fewer "
            "hospitals, another scheme, or more data."
        )
    origins = [values[i] for i in range(n)] if plan.scheme == "natural" else [""] * n
    return groups, origins


def _write_hospital(
    folder: Path,
    source: Path,
    records: list[dict[str, str]],
    columns: list[str],
    *,
    declared: tuple[str, ...],
    dropped_fields: tuple[str, ...],
    drop_text: bool,
    drop_images: bool,
) -> tuple[list[dict[str, str]], int]:
    """One hospital's manifest.csv with image paths relative to it; returns its rows and drops.

    `declared`: the structured fields it keeps (a row with one of them is not empty);
    `dropped_fields`: those it loses."""
    written, dropped = [], 0
    for rec in records:
        row = {c: rec.get(c, "") for c in columns}
        image = row["image"].strip()
        if image:
            row["image"] = os.path.relpath(source.parent / image, folder)
        if drop_text:
            row["text"] = ""
        if drop_images:
            row["image"] = ""
        row.update(dict.fromkeys(dropped_fields, ""))
        has_fields = any(row.get(name, "").strip() for name in declared)
        if not row["image"].strip() and not row["text"].strip() and not has_fields:
            dropped += 1
            continue
        written.append(row)
    with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(written)
    return written, dropped


def format_partition(
    out: Path,
    plan: PartitionPlan,
    summaries: list[HospitalSummary],
    class_names: tuple[str, ...],
    fields: str = "",
) -> str:
    """A table of what each hospital received, and the command that simulates them (`fields`:
    the structured fields' schema the partition was checked with)."""
    with_fields = any(s.rows_with_fields for s in summaries) or bool(plan.drop_fields)
    head = (
        f"{'hospital':<12}{'patients':>9}{'rows':>7}{'image':>7}{'text':>7}"
        + (f"{'fields':>7}" if with_fields else "")
        + "  "
        + "  ".join(f"{c:>10}" for c in class_names)
    )
    lines = [
        f"{plan.scheme} partition of {sum(s.patients for s in summaries)} patients "
        f"into {plan.hospitals} hospitals (seed {plan.seed}):",
        head,
    ]
    for s in summaries:
        labels = "  ".join(f"{s.labels.get(c, 0):>10}" for c in class_names)
        extra = f"  {s.origin}" if s.origin else ""
        extra += f"  ({s.dropped_rows} rows dropped: no modality left)" if s.dropped_rows else ""
        lines.append(
            f"{s.name:<12}{s.patients:>9}{s.rows:>7}{s.rows_with_image:>7}{s.rows_with_text:>7}"
            + (f"{s.rows_with_fields:>7}" if with_fields else "")
            + f"  {labels}{extra}"
        )
    declared = f' -c "tabular-fields={fields}"' if fields else ""
    lines.append(
        f"Simulate them: fedfusion simulate --data-root {out} --hospitals {plan.hospitals}"
        + declared
    )
    return "\n".join(lines)
