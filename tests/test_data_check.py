"""`fedfusion data check`: every problem of a bad manifest, with its row; summary; warnings."""

from __future__ import annotations

import csv
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from common.data.check import check_manifest
from tools.cli import main

CLASSES = ("normal", "pneumonia", "effusion")
FIELDS = ["image", "text", "label", "patient_id", "split"]


def write_manifest(folder: Path, rows: list[dict[str, str]]) -> Path:
    path = folder / "manifest.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def bad_site(tmp_path: Path) -> Path:
    """A site whose manifest holds one of each problem the check must find."""
    img = tmp_path / "img"
    img.mkdir()
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8)).save(img / "ok.png")
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), img / "ct.dcm")
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (img / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00ab")
    write_manifest(
        tmp_path,
        [
            {
                "image": "img/ok.png",
                "text": "lungs clear",
                "label": "normal",
                "patient_id": "p1",
            },  # 2
            {"image": "img/ct.dcm", "text": "", "label": "pneumonia", "patient_id": "p2"},  # 3
            {
                "image": "img/gone.png",
                "text": "x",
                "label": "normal",
                "patient_id": "p3",
            },  # 4 missing
            {
                "image": "img/broken.png",
                "text": "",
                "label": "normal",
                "patient_id": "p4",
            },  # 5 unreadable
            {
                "image": "img/corrupt.dcm",
                "text": "",
                "label": "normal",
                "patient_id": "p5",
            },  # 6 corrupt
            {"image": "", "text": "effusion", "label": "efusion", "patient_id": "p6"},  # 7 label
            {"image": "", "text": "", "label": "normal", "patient_id": "p7"},  # 8 empty
            {
                "image": "img/ok.png",
                "text": "lungs clear",
                "label": "normal",
                "patient_id": "p1",
            },  # 9 dup
            {
                "image": "",
                "text": "a",
                "label": "normal",
                "patient_id": "p8",
                "split": "train",
            },  # 10
            {
                "image": "",
                "text": "b",
                "label": "normal",
                "patient_id": "p8",
                "split": "val",
            },  # 11 2 splits
        ],
    )
    return tmp_path


def test_every_problem_is_reported_with_its_row(bad_site: Path) -> None:
    report = check_manifest(bad_site, CLASSES)
    manifest = bad_site / "manifest.csv"
    expected = {
        4: "image file .*gone.png does not exist",
        5: "broken.png",
        6: "corrupt.dcm",
        7: "unknown label 'efusion'",
        8: r"empty row \(no image and no text\)",
        9: "duplicate of row 2",
        11: "patient 'p8' is in split 'val' here but in 'train' at row 10",
    }
    assert len(report.problems) == len(expected), report.problems
    for problem, (line, pattern) in zip(report.problems, sorted(expected.items()), strict=True):
        assert problem.startswith(f"{manifest}:{line}: ")
        assert re.search(pattern, problem), problem
    assert not report.ok


def test_summary_and_warnings(bad_site: Path) -> None:
    report = check_manifest(bad_site, CLASSES)
    assert (report.rows, report.patients) == (10, 8)
    assert report.label_counts == {"normal": 8, "pneumonia": 1, "effusion": 0}
    assert (report.missing_image, report.missing_text) == (4, 4)
    assert report.images_read == 2  # ok.png and ct.dcm (read once although used twice)
    assert any(w.startswith("tiny site: 10 rows") for w in report.warnings)
    assert any("['effusion']" in w for w in report.warnings)


def test_cli_exit_codes_and_output(
    bad_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["data", "check", str(bad_site)]) == 1
    out = capsys.readouterr().out
    assert "manifest.csv:6: " in out and "FAILED: 7 problem(s)" in out
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(good / "a.png")
    write_manifest(
        good,
        [{"image": "a.png", "text": "", "label": "yes"}, {"image": "", "text": "b", "label": "no"}],
    )
    assert main(["data", "check", str(good), "--class-names", "no,yes"]) == 0
    out = capsys.readouterr().out
    assert "OK: the manifest is usable." in out and "warning: tiny site" in out
    assert main(["data", "check", str(good)]) == 1  # default class names: 'yes' is unknown
    assert main(["data", "check", str(tmp_path / "absent")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_twenty_thousand_rows_are_checked_quickly(tmp_path: Path) -> None:
    """Rows share a few images: the check reads each file once and the rows in well under 10 s."""
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    labels = list(CLASSES)
    rows = [
        {
            "image": f"{i % 4}.png" if i % 5 else "",
            "text": "" if i % 5 == 1 else f"report {i}",
            "label": labels[i % 3],
            "patient_id": f"p{i // 2}",
        }
        for i in range(20_000)
    ]
    write_manifest(tmp_path, rows)
    start = time.perf_counter()
    report = check_manifest(tmp_path, CLASSES)
    seconds = time.perf_counter() - start
    assert report.ok, report.problems[:3]
    assert (report.rows, report.patients, report.images_read) == (20_000, 10_000, 4)
    assert report.missing_image == report.missing_text == 4_000
    assert seconds < 10, f"checking 20k rows took {seconds:.1f} s"
