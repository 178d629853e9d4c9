"""A site's manifest: reading and checking it, and the patient-level split.

A manifest is a CSV or JSONL file (or a folder holding `manifest.csv` / `manifest.jsonl`) with the
columns `image` (PNG/JPEG/DICOM path relative to the manifest, read by `common.data.images`; may be
empty), `text` (report text; may be empty), `label` (one of the run's class names), optional
`patient_id` (rows of one patient always land in the same split; without it each row is its own
patient) and optional `split` (`train` or `val`, overriding the random patient-level split).
With structured fields declared (run config `tabular-fields`, `common.data.tabular`), a column per
field; an empty cell or an absent column is a missing value, and a row may then hold fields only.
Every problem is reported with its file and row. The torch Dataset over the rows is
`common.data.dataset`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from common.data.tabular import Cell, TabularField
from common.errors import BadData

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
REQUIRED_COLUMNS = ("image", "text", "label")
SPLITS = ("train", "val")


class ManifestError(BadData):
    """A manifest cannot be used; `problems` lists every problem as `file:row: message`."""

    def __init__(self, manifest: Path, problems: list[str]) -> None:
        self.manifest, self.problems = manifest, problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} problem(s) in manifest {manifest}:\n  {shown}{more}")


@dataclass(frozen=True)
class Row:
    """One case of a manifest: an image and/or a report, and its label."""

    line: int  # the row's line in the file (1 = header for CSV), for error messages
    image: Path | None
    text: str
    label: str
    patient_id: str
    split: str | None
    tabular: tuple[Cell, ...] = ()  # the declared fields' checked cells (None: missing)

    @property
    def has_tabular(self) -> bool:
        """At least one declared structured field is present."""
        return any(c is not None for c in self.tabular)


def find_manifest(path: Path) -> Path:
    """The manifest file itself, or the one manifest inside a folder."""
    if path.is_file():
        return path
    if path.is_dir():
        found = [path / name for name in MANIFEST_NAMES if (path / name).is_file()]
        if len(found) == 1:
            return found[0]
        if found:
            raise ManifestError(path, [f"{path}: holds both {MANIFEST_NAMES}; keep one."])
        raise ManifestError(path, [f"{path}: no {' or '.join(MANIFEST_NAMES)} in this folder."])
    raise ManifestError(path, [f"{path}: no such file or folder (check the site's manifest path)."])


def raw_records(
    manifest: Path,
    required: tuple[str, ...] = REQUIRED_COLUMNS,
) -> list[tuple[int, dict[str, str]]]:
    """(line, record) pairs from a CSV or JSONL manifest."""
    if manifest.suffix == ".jsonl":
        records = []
        with manifest.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    problem = f"{manifest}:{line_no}: not valid JSON ({err.msg})."
                    raise ManifestError(manifest, [problem]) from err
                if not isinstance(obj, dict):
                    raise ManifestError(
                        manifest, [f"{manifest}:{line_no}: expected a JSON object."]
                    )
                records.append((line_no, {k: "" if v is None else str(v) for k, v in obj.items()}))
        return records
    if manifest.suffix != ".csv":
        raise ManifestError(manifest, [f"{manifest}: unknown manifest type; use .csv or .jsonl."])
    with manifest.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(
                manifest,
                [f"{manifest}:1: missing column(s) {missing}; required: {list(required)}."],
            )
        return [
            (i, {k: (v or "") for k, v in rec.items() if k is not None})
            for i, rec in enumerate(reader, start=2)
        ]


class Problem(NamedTuple):
    """One problem of a manifest, at a row (its line in the file)."""

    line: int
    text: str  # "file:line: message"


@dataclass(frozen=True)
class ManifestScan:
    """A manifest's rows and every row-level problem found without opening the images."""

    manifest: Path
    rows: list[Row]
    problems: list[Problem]


def read_manifest(
    path: Path, class_names: tuple[str, ...], *, fields: tuple[TabularField, ...] = ()
) -> tuple[Path, list[Row]]:
    """Read and check a site's manifest; raise ManifestError listing every problem found."""
    return _read_rows(path, class_names, REQUIRED_COLUMNS, fields)


def read_cases(
    path: Path, class_names: tuple[str, ...], *, fields: tuple[TabularField, ...] = ()
) -> tuple[Path, list[Row]]:
    """Read and check cases to predict: a manifest whose `label` may be missing or empty ("")."""
    return _read_rows(path, class_names, ("image", "text"), fields)


def _read_rows(
    path: Path,
    class_names: tuple[str, ...],
    required: tuple[str, ...],
    fields: tuple[TabularField, ...],
) -> tuple[Path, list[Row]]:
    scan = scan_manifest(path, class_names, required, fields=fields)
    if scan.problems:
        raise ManifestError(scan.manifest, [p.text for p in scan.problems])
    return scan.manifest, scan.rows


def scan_manifest(
    path: Path,
    class_names: tuple[str, ...],
    required: tuple[str, ...] = REQUIRED_COLUMNS,
    *,
    fields: tuple[TabularField, ...] = (),
) -> ManifestScan:
    """Read a manifest and list the problems of its rows (a file that cannot be parsed raises).

    Without `label` in `required` (cases to predict) a row may have no label, and duplicate
    rows and split conflicts are not problems. A declared field's out-of-schema cell is a
    problem naming its column (never its value) and counts as missing.
    """
    labelled = "label" in required
    manifest = find_manifest(path)
    records = raw_records(manifest, required)
    if not records:
        raise ManifestError(manifest, [f"{manifest}: the manifest has no rows."])
    rows, problems = [], []
    seen: dict[tuple[str, ...], int] = {}  # a row's content -> the first line holding it
    for line, rec in records:
        where = f"{manifest}:{line}"
        found = [f"missing field '{col}'." for col in required if col not in rec]
        image_rel, text = rec.get("image", "").strip(), rec.get("text", "").strip()
        label, split = rec.get("label", "").strip(), rec.get("split", "").strip() or None
        patient_raw = rec.get("patient_id", "").strip()
        cells: list[Cell] = []
        for f in fields:
            value, why = f.check(rec.get(f.name, ""))
            cells.append(value)
            if why is not None:
                found.append(f"column '{f.name}': the value is {why} (tabular-fields).")
        if not image_rel and not text and all(c is None for c in cells):
            some = "no image, no text and no structured field" if fields else "no image and no text"
            found.append(f"empty row ({some}).")
        if label not in class_names and (label or labelled):
            found.append(
                f"unknown label {label!r}; the run's class names are {list(class_names)} "
                "(run config key class-names)."
            )
        if split is not None and split not in SPLITS:
            found.append(f"unknown split {split!r}; use one of {list(SPLITS)} or leave it empty.")
        image = (manifest.parent / image_rel) if image_rel else None
        if image is not None and not image.is_file():
            found.append(f"image file {image} does not exist.")
        key = (image_rel, text, label, patient_raw, split or "", *map(repr, cells))
        if labelled and key in seen and (image_rel or text):
            found.append(
                f"duplicate of row {seen[key]} (same image, text, label, patient and split)."
            )
        seen.setdefault(key, line)
        problems += [Problem(line, f"{where}: {message}") for message in found]
        row = Row(line, image, text, label, patient_raw or f"row-{line}", split, tuple(cells))
        rows.append(row)
    problems += _split_conflicts(manifest, rows) if labelled else []
    return ManifestScan(manifest, rows, sorted(problems, key=lambda p: p.line))


def _split_conflicts(manifest: Path, rows: list[Row]) -> list[Problem]:
    """Rows that put a patient in a second split (patients never straddle train and val)."""
    first: dict[str, Row] = {}
    problems = []
    for row in rows:
        if row.split not in SPLITS:
            continue
        other = first.setdefault(row.patient_id, row)
        if other.split != row.split:
            problems.append(
                Problem(
                    row.line,
                    (
                        f"{manifest}:{row.line}: patient {row.patient_id!r} is in split "
                        f"'{row.split}' here but in '{other.split}' at row {other.line}; "
                        "a patient's rows must share one split."
                    ),
                )
            )
    return problems


def split_by_patient(
    rows: list[Row], val_fraction: float, seed: int
) -> tuple[list[Row], list[Row]]:
    """Train/validation split by patient (seeded); a row's `split` column takes precedence."""
    free = sorted({r.patient_id for r in rows if r.split is None})
    random.Random(seed).shuffle(free)
    n_val = min(max(1, math.ceil(val_fraction * len(free))), len(free) - 1) if len(free) > 1 else 0
    val_patients = set(free[:n_val])
    fixed = {r.patient_id: r.split for r in rows if r.split is not None}
    train: list[Row] = []
    val: list[Row] = []
    for r in rows:
        split = r.split or ("val" if r.patient_id in val_patients else "train")
        if r.split is None and r.patient_id in fixed:
            split = fixed[r.patient_id]  # keep a patient together with their fixed rows
        (val if split == "val" else train).append(r)
    return train, val
