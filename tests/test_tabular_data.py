"""Structured fields as site data: the schema, per-cell checks and missing cells, the data check,
and the dataset's tensors (none declared: cases exactly as before)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, run_config_with
from common.data.check import check_manifest, format_report
from common.data.dataset import ManifestDataset
from common.data.manifest import ManifestError, read_manifest
from common.data.tabular import TabularField, parse_tabular_fields
from common.data.version import ImageDigests, dataset_version
from common.model.encoders import load_tokenizer

CLASSES = ("normal", "pneumonia", "effusion")
SCHEMA = "age:numeric:0:120;sex:categorical:F|M;temp:numeric:34:42"
COLUMNS = ["image", "text", "label", "patient_id", "age", "sex", "temp"]


def write_csv(folder: Path, rows: list[dict[str, str]], columns: list[str] = COLUMNS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return folder / "manifest.csv"


def test_schema_parses_into_typed_fields() -> None:
    fields = run_config_with({"tabular-fields": SCHEMA}).model.tabular
    assert fields[0] == TabularField(name="age", kind="numeric", low=0.0, high=120.0)
    assert fields[1] == TabularField(name="sex", kind="categorical", categories=("F", "M"))
    assert run_config_with({}).model.tabular == ()  # the default declares none
    assert parse_tabular_fields(" ; age:numeric:0:1 ;") == (
        TabularField(name="age", kind="numeric", low=0.0, high=1.0),
    )


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ("age:numeric:120:0", "two finite bounds low < high"),
        ("age:numeric:0", "two finite bounds"),
        ("age:numeric:0:inf", "two finite bounds"),
        ("sex:categorical:F", "2 to 64 distinct categories"),
        ("sex:categorical:F|F", "distinct categories"),
        ("age:ordinal:1|2", "the kind must be one of"),
        ("1age:numeric:0:1", "a name is 1 to 32 letters"),
        ("label:numeric:0:1", "'label' is a manifest column of its own"),
        ("age:numeric:0:1;age:numeric:0:2", "a field name appears twice"),
    ],
)
def test_schema_errors_name_the_key_and_the_fix(schema: str, why: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(why)) as err:
        run_config_with({"tabular-fields": schema})
    assert "'tabular-fields'" in str(err.value) and "age:numeric:0:120" in str(err.value)
    assert err.value.reason == "run-config"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_csv(
        tmp_path,
        [
            {"text": "a", "label": "normal", "age": "40", "sex": "F", "temp": "37"},  # 2
            {"text": "b", "label": "normal", "age": "", "sex": "M", "temp": ""},  # 3 missing
            {
                "text": "",
                "label": "pneumonia",
                "age": "70",
                "sex": "",
                "temp": "39",
            },  # 4 fields only
            {"text": "c", "label": "normal", "age": "", "sex": "", "temp": ""},  # 5 all missing
        ],
    )


def test_missing_cells_are_none_and_a_row_may_hold_fields_only(site: Path) -> None:
    fields = parse_tabular_fields(SCHEMA)
    _, rows = read_manifest(site, CLASSES, fields=fields)
    assert [r.tabular for r in rows] == [
        (40.0, "F", 37.0),
        (None, "M", None),
        (70.0, None, 39.0),
        (None, None, None),
    ]
    assert [r.has_tabular for r in rows] == [True, True, True, False]


def test_out_of_schema_cells_name_file_row_and_column_never_the_value(tmp_path: Path) -> None:
    rows = [
        {"text": "a", "label": "normal", "age": "131", "sex": "F", "temp": "37"},  # 2
        {"text": "b", "label": "normal", "age": "forty", "sex": "X", "temp": "36"},  # 3
        {"text": "", "label": "normal", "age": "", "sex": "", "temp": ""},  # 4 empty row
    ]
    manifest = write_csv(tmp_path, rows)
    fields = parse_tabular_fields(SCHEMA)
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest, CLASSES, fields=fields)
    problems = err.value.problems
    assert problems == [
        f"{manifest}:2: column 'age': the value is outside the range 0 to 120 (tabular-fields).",
        f"{manifest}:3: column 'age': the value is not a number (tabular-fields).",
        f"{manifest}:3: column 'sex': the value is not one of the categories ['F', 'M'] "
        "(tabular-fields).",
        f"{manifest}:4: empty row (no image, no text and no structured field).",
    ]
    assert not any(v in p for p in problems for v in ("131", "forty", "'X'"))
    report = check_manifest(manifest, CLASSES, fields=fields)
    assert report.problems == problems
    assert report.out_of_schema_by_field == {"age": 2, "sex": 1, "temp": 0}
    assert report.missing_by_field == {"age": 3, "sex": 2, "temp": 1}  # out of schema: missing


def test_data_check_command_takes_the_schema(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.cli import main

    assert main(["data", "check", str(site), "--tabular-fields", SCHEMA]) == 0
    assert "field temp         2 rows missing (0 out of schema)" in capsys.readouterr().out
    assert main(["data", "check", str(site), "--tabular-fields", "age:numeric:1"]) == 2
    assert "'tabular-fields'" in capsys.readouterr().err


def test_data_check_counts_missing_per_column_and_warns_of_absent_columns(
    tmp_path: Path,
) -> None:
    columns = ["image", "text", "label", "patient_id", "age", "sex"]  # no temp column
    rows = [
        {"text": "a", "label": "normal", "age": "40", "sex": ""},
        {"text": "b", "label": "normal", "age": "", "sex": ""},
    ]
    manifest = write_csv(tmp_path, rows, columns)
    report = check_manifest(manifest, CLASSES, fields=parse_tabular_fields(SCHEMA))
    assert report.ok
    assert report.missing_by_field == {"age": 1, "sex": 2, "temp": 2}
    assert report.absent_fields == ("temp",)
    assert any("no column for structured field(s) ['temp']" in w for w in report.warnings)
    assert "  field sex          2 rows missing (0 out of schema)" in format_report(report)


def test_dataset_carries_encoded_fields_and_without_a_schema_is_unchanged(
    tmp_path: Path,
) -> None:
    site = write_csv(
        tmp_path,
        [
            {"text": "a", "label": "normal", "age": "40", "sex": "F", "temp": "37"},
            {"text": "b", "label": "normal", "age": "", "sex": "M", "temp": ""},
            {"text": "d", "label": "pneumonia", "age": "70", "sex": "", "temp": "39"},
            {"text": "c", "label": "normal", "age": "", "sex": "", "temp": ""},
        ],
    )
    tok, fields = load_tokenizer("builtin:tiny"), parse_tabular_fields(SCHEMA)
    manifest, rows = read_manifest(site, CLASSES, fields=fields)
    ds = ManifestDataset(manifest, rows, CLASSES, tok, 16, 12, fields=fields)
    first, third = ds[0], ds[2]
    # numeric scaled by the schema's fixed range to [-1, 1]; missing cells 0 and flagged
    torch.testing.assert_close(first["tabular_numeric"], torch.tensor([40 / 60 - 1, 3 / 8 * 2 - 1]))
    assert first["tabular_categorical"].tolist() == [0] and third[
        "tabular_categorical"
    ].tolist() == [0]
    assert third["tabular_missing"].tolist() == [False, True, False]
    assert [bool(ds[i]["has_tabular"]) for i in range(4)] == [True, True, True, False]

    _, plain_rows = read_manifest(site, CLASSES)
    plain = ManifestDataset(manifest, plain_rows, CLASSES, tok, 16, 12)
    keys = {"images", "input_ids", "attention_mask", "has_image", "has_text", "labels"}
    assert set(plain[0]) == keys and set(first) == keys | {
        "tabular_numeric",
        "tabular_categorical",
        "tabular_missing",
        "has_tabular",
    }
    # the fields' values are part of the dataset version only when declared
    images = ImageDigests()
    assert dataset_version(rows, images) != dataset_version(plain_rows, images)


def test_simulate_on_generated_demo_data_declares_its_fields(tmp_path: Path) -> None:
    from common.config import RunConfig, default_user_config
    from simulations.cli import build_parser, user_config_from_args
    from simulations.demo_data import DEMO_TABULAR_FIELDS, write_demo_hospitals

    defaults = default_user_config()
    demo = user_config_from_args(build_parser(defaults).parse_args([]), tmp_path, defaults)
    assert RunConfig.from_user_config(demo).model.tabular_fields == DEMO_TABULAR_FIELDS
    two = build_parser(defaults).parse_args(["-c", "tabular-fields="])
    assert user_config_from_args(two, tmp_path, defaults)["tabular-fields"] == ""
    own = build_parser(defaults).parse_args(["--data-root", str(tmp_path)])
    assert user_config_from_args(own, tmp_path, defaults)["tabular-fields"] == ""
    # the demo hospitals' fields pass their own schema's checks
    write_demo_hospitals(tmp_path, 1, seed=0, size_scale=0.05)
    fields = parse_tabular_fields(DEMO_TABULAR_FIELDS)
    report = check_manifest(tmp_path / "hospital-0", CLASSES, fields=fields)
    assert report.ok and not report.absent_fields
    assert all(n < report.rows for n in report.missing_by_field.values())
