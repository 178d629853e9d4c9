"""A site's data check before any training: every problem at once, a summary, and warnings.

`check_manifest` runs the manifest checks of `common.data.manifest` (the same ones training runs),
then opens every image the way training reads it, so corrupt or undecodable files are found now
rather than in the middle of a round. With structured fields declared it counts, per column, the
missing cells and the out-of-schema ones (each also a problem naming file, row and column; values
are never shown). Warnings (a tiny site, a class with no rows, a modality absent
at the site) do not make the data unusable.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from common.data.images import ImageReadError, read_gray
from common.data.manifest import Problem, Row, raw_records, scan_manifest
from common.data.tabular import TabularField

# Below this many rows a site's DP noise swamps its gradient and its validation split holds a
# handful of patients: training still runs, but the site's updates and metrics are mostly noise.
TINY_SITE_ROWS = 100


@dataclass(frozen=True)
class CheckReport:
    """What `fedfusion data check` reports about one manifest."""

    manifest: Path
    problems: list[str]  # "file:row: message", in row order; any problem fails the check
    warnings: list[str]
    rows: int
    patients: int
    label_counts: dict[str, int]  # every class name, in the run's order, 0 included
    missing_image: int  # rows without an image (text only)
    missing_text: int  # rows without a report (image only)
    images_read: int  # distinct image files opened and decoded
    # declared structured fields (tabular-fields), by column: rows whose cell is empty, rows
    # whose cell is out of schema (also counted as missing), and columns absent from the file
    missing_by_field: dict[str, int] = field(default_factory=dict)
    out_of_schema_by_field: dict[str, int] = field(default_factory=dict)
    absent_fields: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.problems


def check_manifest(
    path: Path, class_names: tuple[str, ...], *, fields: tuple[TabularField, ...] = ()
) -> CheckReport:
    """Check every row, open every image; raises ManifestError only if the file is unparseable."""
    scan = scan_manifest(path, class_names, fields=fields)
    image_problems, images_read = _image_problems(scan.manifest, scan.rows)
    problems = sorted([*scan.problems, *image_problems], key=lambda p: p.line)
    rows = scan.rows
    labels = Counter(r.label for r in rows)
    counts = _field_counts(scan.manifest, rows, fields) if fields else FieldCounts({}, {}, ())
    report = CheckReport(
        manifest=scan.manifest,
        problems=[p.text for p in problems],
        warnings=[],
        rows=len(rows),
        patients=len({r.patient_id for r in rows}),
        label_counts={name: labels.get(name, 0) for name in class_names},
        missing_image=sum(r.image is None for r in rows),
        missing_text=sum(not r.text for r in rows),
        images_read=images_read,
        missing_by_field=counts.missing_by_field,
        out_of_schema_by_field=counts.out_of_schema_by_field,
        absent_fields=counts.absent_fields,
    )
    report.warnings.extend(_warnings(report))
    return report


class FieldCounts(NamedTuple):
    """Per declared column: missing cells, out-of-schema cells; the columns the file lacks."""

    missing_by_field: dict[str, int]
    out_of_schema_by_field: dict[str, int]
    absent_fields: tuple[str, ...]


def _field_counts(manifest: Path, rows: list[Row], fields: tuple[TabularField, ...]) -> FieldCounts:
    """Count each declared field's missing and out-of-schema cells (values are not kept)."""
    records = raw_records(manifest, ())
    columns = set().union(*(rec.keys() for _, rec in records))
    out = {
        f.name: sum(f.check(rec.get(f.name, ""))[1] is not None for _, rec in records)
        for f in fields
    }
    missing = {f.name: sum(r.tabular[i] is None for r in rows) for i, f in enumerate(fields)}
    return FieldCounts(missing, out, tuple(f.name for f in fields if f.name not in columns))


def _image_problems(manifest: Path, rows: list[Row]) -> tuple[list[Problem], int]:
    """Open every existing image once (rows may share one); a bad image is reported at each row."""
    errors: dict[Path, str | None] = {}
    problems = []
    for row in rows:
        if row.image is None or not row.image.is_file():  # absent files are already reported
            continue
        if row.image not in errors:
            try:
                read_gray(row.image)
                errors[row.image] = None
            except ImageReadError as err:
                errors[row.image] = str(err)
        if errors[row.image] is not None:
            problems.append(Problem(row.line, f"{manifest}:{row.line}: {errors[row.image]}"))
    return problems, sum(e is None for e in errors.values())


def _warnings(report: CheckReport) -> list[str]:
    """Facts that do not stop training but that a site should know before it joins."""
    out = []
    if report.rows < TINY_SITE_ROWS:
        out.append(
            f"tiny site: {report.rows} rows (fewer than {TINY_SITE_ROWS}); with DP the noise "
            "dominates its updates and its validation metrics rest on a few patients."
        )
    absent = [name for name, n in report.label_counts.items() if n == 0]
    if absent:
        out.append(f"no rows of class(es) {absent}: this site cannot teach or validate them.")
    if report.missing_text == report.rows:
        out.append("no row has a report: the text side of the model is not trained at this site.")
    if report.missing_image == report.rows:
        out.append("no row has an image: the image side of the model is not trained at this site.")
    if report.absent_fields:
        out.append(
            f"no column for structured field(s) {list(report.absent_fields)}: every row lacks "
            "them (check the column names against tabular-fields)."
        )
    if report.missing_by_field and all(n == report.rows for n in report.missing_by_field.values()):
        out.append(
            "no row has a structured field: the tabular side of the model is not trained here."
        )
    return out


def format_report(report: CheckReport) -> str:
    """The check's report for a person: problems, summary, warnings, verdict."""
    lines = [*report.problems]
    if report.problems:
        lines.append("")
    labels = ", ".join(f"{name} {n}" for name, n in report.label_counts.items())
    lines += [
        f"{report.manifest}:",
        f"  rows      {report.rows}",
        f"  patients  {report.patients}",
        f"  labels    {labels}",
        f"  no image  {report.missing_image} rows (text only)",
        f"  no text   {report.missing_text} rows (image only)",
        f"  images    {report.images_read} distinct files read",
    ]
    for name, missing in report.missing_by_field.items():
        bad = report.out_of_schema_by_field.get(name, 0)
        lines.append(f"  field {name:<12} {missing} rows missing ({bad} out of schema)")
    lines += [f"warning: {w}" for w in report.warnings]
    verdict = (
        f"FAILED: {len(report.problems)} problem(s); fix them and run the check again."
        if report.problems
        else "OK: the manifest is usable."
    )
    return "\n".join([*lines, verdict])
