"""A site's dataset version: a digest of what its rows hold, not of how the manifest is written.

The version names the data a privacy budget is spent on (`budget-scope = "dataset"`) and what a
run's plan assumes. It is the SHA-256 over every row's image bytes, report text, label, patient
and split, in an order-free way: re-exporting the manifest (other column order, quoting, blank
lines, row order, CSV or JSONL) gives the same version; changing a label, a report or an image
gives another. Image digests are remembered by (path, size, modification time, inode), so a
long-lived site re-reads only images that changed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from common.data.manifest import Row
from common.files import file_sha256

ImageKey = tuple[str, int, int, int]  # (path, size, mtime_ns, inode)


class ImageDigests:
    """SHA-256 of image files, recomputed only when a file's size, time or inode changes."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[ImageKey, str]] = {}

    def digest(self, path: Path) -> str:
        """The SHA-256 of the file's bytes."""
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._known.get(key[0])
        if known is None or known[0] != key:
            known = (key, file_sha256(path))
            self._known[key[0]] = known
        return known[1]


def row_digest(row: Row, images: ImageDigests) -> str:
    """One row's content digest (fields length-prefixed, so no two rows can collide by joining)."""
    image = images.digest(row.image) if row.image is not None else ""
    # a row without a patient id is named after its line: that name is not content
    patient = "" if row.patient_id == f"row-{row.line}" else row.patient_id
    fields: tuple[str, ...] = (image, row.text, row.label, patient, row.split or "")
    # the structured fields' cells (none declared: the digest is the two-modality one)
    fields += tuple("" if c is None else repr(c) for c in row.tabular)
    return hashlib.sha256("".join(f"{len(f)}:{f}" for f in fields).encode()).hexdigest()


def dataset_version(rows: Iterable[Row], images: ImageDigests) -> str:
    """The dataset version of `rows` (independent of their order in the manifest)."""
    digest = hashlib.sha256()
    for row in sorted(row_digest(r, images) for r in rows):
        digest.update(row.encode())
    return digest.hexdigest()


def record_keys(rows: Iterable[Row], images: ImageDigests) -> frozenset[str]:
    """What identifies the rows' records across versions: each image's bytes and each report
    with its patient (a label, split or id edited in place keeps a row's keys)."""
    keys: set[str] = set()
    for row in rows:
        if row.image is not None:
            keys.add(hashlib.sha256(f"image:{images.digest(row.image)}".encode()).hexdigest())
        if row.text:
            report = f"report:{len(row.patient_id)}:{row.patient_id}:{row.text}"
            keys.add(hashlib.sha256(report.encode()).hexdigest())
        if row.has_tabular:  # structured fields: a record of their patient, like a report
            cells = "|".join("" if c is None else repr(c) for c in row.tabular)
            record = f"tabular:{len(row.patient_id)}:{row.patient_id}:{cells}"
            keys.add(hashlib.sha256(record.encode()).hexdigest())
    return frozenset(keys)
