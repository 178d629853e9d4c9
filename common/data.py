"""A site's data: manifest reading and checking, the patient-level split, and the torch Dataset.

A manifest is a CSV or JSONL file (or a folder holding `manifest.csv` / `manifest.jsonl`) with the
columns `image` (PNG/JPEG/DICOM path relative to the manifest, read by `common.images`; may be
empty), `text` (report text; may be empty), `label` (one of the run's class names), optional
`patient_id` (rows of one patient always land in the same split; without it each row is its own
patient) and optional `split` (`train` or `val`, overriding the random patient-level split).
Every problem is reported with its file and row.
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

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from common.images import ImageReadError, read_gray

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
REQUIRED_COLUMNS = ("image", "text", "label")
SPLITS = ("train", "val")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ManifestError(ValueError):
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


def raw_records(manifest: Path, required: tuple[str, ...] = REQUIRED_COLUMNS,
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
                    raise ManifestError(manifest, [f"{manifest}:{line_no}: expected a JSON object."])
                records.append((line_no, {k: "" if v is None else str(v) for k, v in obj.items()}))
        return records
    if manifest.suffix != ".csv":
        raise ManifestError(manifest, [f"{manifest}: unknown manifest type; use .csv or .jsonl."])
    with manifest.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(manifest, [f"{manifest}:1: missing column(s) {missing}; "
                                           f"required: {list(required)}."])
        return [(i, {k: (v or "") for k, v in rec.items() if k is not None})
                for i, rec in enumerate(reader, start=2)]


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


def read_manifest(path: Path, class_names: tuple[str, ...]) -> tuple[Path, list[Row]]:
    """Read and check a site's manifest; raise ManifestError listing every problem found."""
    return _read_rows(path, class_names, REQUIRED_COLUMNS)


def read_cases(path: Path, class_names: tuple[str, ...]) -> tuple[Path, list[Row]]:
    """Read and check cases to predict: a manifest whose `label` may be missing or empty ("")."""
    return _read_rows(path, class_names, ("image", "text"))


def _read_rows(path: Path, class_names: tuple[str, ...],
               required: tuple[str, ...]) -> tuple[Path, list[Row]]:
    scan = scan_manifest(path, class_names, required)
    if scan.problems:
        raise ManifestError(scan.manifest, [p.text for p in scan.problems])
    return scan.manifest, scan.rows


def scan_manifest(path: Path, class_names: tuple[str, ...],
                  required: tuple[str, ...] = REQUIRED_COLUMNS) -> ManifestScan:
    """Read a manifest and list the problems of its rows (a file that cannot be parsed raises).

    Without `label` in `required` (cases to predict) a row may have no label, and duplicate
    rows and split conflicts are not problems.
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
        if not image_rel and not text:
            found.append("empty row (no image and no text).")
        if label not in class_names and (label or labelled):
            found.append(f"unknown label {label!r}; the run's class names are {list(class_names)} "
                         "(run config key class-names).")
        if split is not None and split not in SPLITS:
            found.append(f"unknown split {split!r}; use one of {list(SPLITS)} or leave it empty.")
        image = (manifest.parent / image_rel) if image_rel else None
        if image is not None and not image.is_file():
            found.append(f"image file {image} does not exist.")
        key = (image_rel, text, label, patient_raw, split or "")
        if labelled and key in seen and (image_rel or text):
            found.append(f"duplicate of row {seen[key]} (same image, text, label, patient and split).")
        seen.setdefault(key, line)
        problems += [Problem(line, f"{where}: {message}") for message in found]
        rows.append(Row(line, image, text, label, patient_raw or f"row-{line}", split))
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
            problems.append(Problem(row.line, (
                f"{manifest}:{row.line}: patient {row.patient_id!r} is in split '{row.split}' here "
                f"but in '{other.split}' at row {other.line}; a patient's rows must share one split.")))
    return problems


def split_by_patient(rows: list[Row], val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Train/validation split by patient (seeded); a row's `split` column takes precedence."""
    free = sorted({r.patient_id for r in rows if r.split is None})
    random.Random(seed).shuffle(free)
    n_val = min(max(1, math.ceil(val_fraction * len(free))), len(free) - 1) if len(free) > 1 else 0
    val_patients = set(free[:n_val])
    fixed = {r.patient_id: r.split for r in rows if r.split is not None}
    train, val = [], []
    for r in rows:
        split = r.split or ("val" if r.patient_id in val_patients else "train")
        if r.split is None and r.patient_id in fixed:
            split = fixed[r.patient_id]  # keep a patient together with their fixed rows
        (val if split == "val" else train).append(r)
    return train, val


class ManifestDataset(Dataset):
    """Rows -> dict of tensors; images are read lazily, reports tokenised once up front."""

    def __init__(self, manifest: Path, rows: list[Row], class_names: tuple[str, ...],
                 tokenizer: PreTrainedTokenizerBase, image_size: int, max_text_length: int) -> None:
        self.manifest, self.rows, self.image_size = manifest, rows, image_size
        # -1: an unlabelled case (prediction only; training and evaluation rows always have one)
        self.labels = torch.tensor([class_names.index(r.label) if r.label else -1 for r in rows],
                                   dtype=torch.long)
        enc = tokenizer([r.text for r in rows] or [""], padding="max_length", truncation=True,
                        max_length=max_text_length, return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self._mean, self._std = mean.view(3, 1, 1), std.view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        has_image = row.image is not None
        image = self._load_image(row) if has_image else torch.zeros(3, self.image_size, self.image_size)
        return {
            "images": image,  # (3, S, S)
            "input_ids": self.input_ids[i],  # (T,)
            "attention_mask": self.attention_mask[i],  # (T,)
            "has_image": torch.tensor(has_image),
            "has_text": torch.tensor(bool(row.text)),
            "labels": self.labels[i],
        }

    def _load_image(self, row: Row) -> torch.Tensor:
        """Grayscale image -> normalised (3, S, S) tensor for the ImageNet-style encoder."""
        try:
            gray = read_gray(row.image)  # (H, W) in [0, 1]
        except ImageReadError as err:
            # one-argument exception: a DataLoader worker re-raises it by type and message
            raise ImageReadError(f"{self.manifest}:{row.line}: {err}") from err
        resized = Image.fromarray(gray).resize((self.image_size, self.image_size),
                                                         Image.BILINEAR)
        x = torch.from_numpy(np.array(resized, dtype=np.float32))  # (S, S)
        # the grayscale fills the encoder's 3 input channels
        return (x.unsqueeze(0).expand(3, -1, -1) - self._mean) / self._std
