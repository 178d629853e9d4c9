"""After a tiny in-process run: its plots and report hold the run's series, and `predict` on the
saved model reproduces the final round's evaluation; the commands fail clearly on bad input."""

from __future__ import annotations

import base64
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from client.app import app as client_app
from common import protocol as R
from common.data.manifest import read_manifest, split_by_patient
from common.runfolder import RunFolder
from common.views.plots import AGGREGATE, plot_epsilon, plot_metric
from server.app import run_federation
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_run, tiny_user_config
from tools.cli import COMMANDS, main
from tools.predict import load_predictor, predict_case, predict_manifest
from tools.report import write_report

# its module-scoped fixture is built once: every test of the module on one xdist worker
pytestmark = pytest.mark.xdist_group("test_report_predict")

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-site, 2-round tiny run (DP on)."""
    out = tmp_path_factory.mktemp("run")
    settings = {
        "output-dir": str(out),
        "run-name": "r",
        "state-root": str(out / "state"),
        "num-server-rounds": 2,
    }
    grid = InProcessGrid(
        client_app,
        [{"partition-id": i, "num-partitions": 2} for i in range(2)],
        tiny_user_config(demo_root, **settings),
    )
    return run_federation(grid, tiny_run(demo_root, **settings))


def _val_manifest(demo_root: Path, dest: Path, site: str) -> Path:
    """The site's validation rows as the server's run split them, in a manifest of their own."""
    cfg = tiny_run(demo_root).model
    _manifest, rows = read_manifest(demo_root / site, cfg.class_names)
    _, val = split_by_patient(rows, tiny_run(demo_root).data.val_fraction, cfg.seed)
    path = dest / f"{site}-val.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "text", "label", "patient_id"])
        writer.writerows([str(r.image or ""), r.text, r.label, r.patient_id] for r in val)
    return path


def test_plots_are_written_and_hold_the_history(run_dir: Path) -> None:
    history = RunFolder(run_dir).read_history()
    for name in ("loss.png", "auroc.png", "accuracy.png", "epsilon.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG
    lines = {
        ln.get_label(): list(ln.get_ydata())
        for ln in plot_metric(history, R.AUROC, "auroc").axes[0].get_lines()
    }
    assert lines[AGGREGATE] == [h.aggregate[R.AUROC] for h in history]
    assert lines["hospital-1"] == [h.sites["hospital-1"].evaluate[R.AUROC] for h in history]
    eps = {ln.get_label(): list(ln.get_ydata()) for ln in plot_epsilon(history).axes[0].get_lines()}
    assert eps["hospital-0"] == [h.sites["hospital-0"].train[R.EPSILON] for h in history]
    assert eps["hospital-0 cap"][0] == 8.0  # the server's target; the default policy adds no cap


def test_tensorboard_events_hold_the_same_series(run_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    history = RunFolder(run_dir).read_history()
    # one event file per round, read in file-name order: within one second the names order by a
    # per-process counter (".9" after ".10"), so the events are compared by step, as TensorBoard
    # plots them
    by_step = sorted(acc.Scalars("epsilon/hospital-1"), key=lambda e: e.step)
    assert [e.step for e in by_step] == [h.round for h in history]
    assert [e.value for e in by_step] == pytest.approx(
        [h.sites["hospital-1"].train[R.EPSILON] for h in history]
    )
    assert sorted(e.step for e in acc.Scalars("loss/aggregate")) == [1, 2]


@pytest.mark.parametrize("fmt", ["html", "md"])
def test_report_holds_sites_metrics_model_privacy_and_plots(run_dir: Path, fmt: str) -> None:
    text = write_report(run_dir, fmt).read_text()
    final = RunFolder(run_dir).read_history()[-1].sites
    for name, s in final.items():
        assert name in text
        assert f"{s.train[R.NUM_EXAMPLES]}" in text and f"{s.evaluate[R.AUROC]:.3f}" in text
        assert f"epsilon = {s.train[R.EPSILON]:.3f} with delta = 1e-05" in text
        assert f"standard deviation {s.train[R.NOISE_MULTIPLIER]:.3f} x 1" in text
    assert "RDP accountant" in text and "protection is per record" in text
    assert "tiny" in text and "concat" in text and "fusion, head" in text
    fingerprint = re.search(
        r'"frozen_fingerprint": "([0-9a-f]{64})"', (run_dir / "model.json").read_text()
    )
    assert fingerprint and fingerprint.group(1) in text
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(images) == 5 and all(base64.b64decode(i)[:8] == PNG for i in images)


def test_predict_reproduces_the_final_round_evaluation(
    run_dir: Path, demo_root: Path, tmp_path: Path
) -> None:
    manifest = _val_manifest(demo_root, tmp_path, "hospital-0")
    result = predict_manifest(load_predictor(run_dir, "cpu"), manifest)
    evaluated = RunFolder(run_dir).read_history()[-1].sites["hospital-0"].evaluate
    assert result.metrics.num_examples == evaluated[R.NUM_EXAMPLES]
    for key in (R.LOSS, R.ACCURACY, R.AUROC, R.F1):
        assert getattr(result.metrics, key) == pytest.approx(evaluated[key], rel=1e-5), key


def test_predict_command_runs_without_flower(
    run_dir: Path, demo_root: Path, tmp_path: Path
) -> None:
    manifest = _val_manifest(demo_root, tmp_path, "hospital-1")
    out = tmp_path / "pred.csv"
    code = (
        "import sys; from tools.cli import main; rc = main(sys.argv[1:]); "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'); "
        "print('flwr modules:', loaded); sys.exit(rc)"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "predict",
            "--model",
            str(run_dir),
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "flwr modules: []" in proc.stdout
    evaluated = RunFolder(run_dir).read_history()[-1].sites["hospital-1"].evaluate
    assert f"accuracy {evaluated[R.ACCURACY]:.4f}" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == evaluated[R.NUM_EXAMPLES]
    assert set(rows[0]) == {
        "line",
        "image",
        "label",
        "prediction",
        "p_normal",
        "p_pneumonia",
        "p_effusion",
    }


def test_one_case_with_either_modality_matches_the_manifest_path(
    run_dir: Path, demo_root: Path, tmp_path: Path
) -> None:
    predictor = load_predictor(run_dir, "cpu")
    manifest = _val_manifest(demo_root, tmp_path, "hospital-0")
    row = next(r for r in csv.DictReader(manifest.open()) if r["image"] and r["text"])
    cases = tmp_path / "cases.csv"  # the same case three ways, unlabelled
    cases.write_text(
        f'image,text\n{row["image"]},"{row["text"]}"\n{row["image"]},\n,"{row["text"]}"\n'
    )
    batch = predict_manifest(predictor, cases)
    assert batch.metrics is None
    for i, (image, text) in enumerate(
        [(row["image"], row["text"]), (row["image"], ""), ("", row["text"])]
    ):
        probs = predict_case(predictor, Path(image) if image else None, text)
        assert sum(probs.values()) == pytest.approx(1.0)
        assert list(probs.values()) == pytest.approx(list(batch.probs[i]), abs=1e-6)
    assert not (batch.probs[1] == batch.probs[2]).all()  # the masked modality matters


def _option_help(help_text: str) -> dict[str, str]:
    """`--option` -> its whole help entry, from an argparse help text."""
    section = help_text.split("options:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", section)
    return {re.findall(r"--[\w-]+", e)[0]: " ".join(e.split()) for e in entries}


def test_every_command_explains_every_option_with_its_default(capsys) -> None:
    for name in COMMANDS:
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"])
        assert stop.value.code == 0
        assert f"fedfusion {name}" in capsys.readouterr().out
    helps: dict[str, dict[str, str]] = {}
    for name, options in {
        "report": ["--format", "--out"],
        "predict": [
            "--model",
            "--image",
            "--text",
            "--manifest",
            "--out",
            "--batch-size",
            "--device",
            "--explain",
            "--explain-max",
            "--ig-steps",
        ],
    }.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        entries = helps[name] = _option_help(capsys.readouterr().out)
        assert set(entries) == {"--help", *options}
        for option in options:
            assert "(default:" in entries[option] or "(required)" in entries[option], entries[
                option
            ]
    assert "(default: html)" in helps["report"]["--format"]
    assert "(default: 64)" in helps["predict"]["--batch-size"]


def test_report_and_predict_fail_clearly_on_a_missing_run_folder(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["predict", "--model", str(missing), "--text", "clear lungs"]) == 2
    assert "is not a folder. Pass a run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no history.jsonl" in capsys.readouterr().err


def test_malformed_input_exits_non_zero_naming_the_problem(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("image,text,label\n,lungs clear,normal\n,effusion,pneumothorax\nmissing.png,,\n")
    assert (
        main(["predict", "--model", str(run_dir), "--manifest", str(bad), "--device", "cpu"]) == 2
    )
    err = capsys.readouterr().err
    assert f"{bad}:3: unknown label 'pneumothorax'" in err
    assert f"{bad}:4: image file" in err and "does not exist" in err
    assert main(["predict", "--model", str(run_dir), "--image", str(tmp_path / "x.png")]) == 2
    assert "x.png does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--model", str(run_dir)])
    assert stop.value.code == 2 and "nothing to predict" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "history.jsonl").write_text('{"round": 1, "sites": {}}\n{oops\n')
    assert main(["report", str(broken)]) == 2
    assert "history.jsonl:2 is not valid JSON" in capsys.readouterr().err


def test_report_gives_each_sites_validation_size_and_warns_below_30() -> None:
    from tools.report import SMALL_VALIDATION, RunRecords, SiteFacts, _final_metrics
    from tools.report_format import to_markdown

    metrics = {R.LOSS: 0.5, R.ACCURACY: 0.8, R.AUROC: 0.9, R.F1: 0.7}
    sites = {
        "big": SiteFacts(evaluate={R.NUM_EXAMPLES: 120, **metrics}, eval_round=1),
        "small": SiteFacts(
            evaluate={R.NUM_EXAMPLES: SMALL_VALIDATION - 1, **metrics}, eval_round=1
        ),
    }
    run = RunRecords(name="r", history=[], settings=None, model=None, summary=None)
    text = to_markdown(_final_metrics(run, sites))
    assert "| big | 1 | 120 |" in text and f"| small | 1 | {SMALL_VALIDATION - 1} |" in text
    assert (
        f"Warning: small ({SMALL_VALIDATION - 1}) validate on fewer than {SMALL_VALIDATION}" in text
    )
    assert "big (" not in text  # a site with enough validation records is not named
