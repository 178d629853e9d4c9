"""End to end on Flower's simulation runtime (Ray): the command a researcher runs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import protocol as R
from common.model.checkpoint import load_model, load_tensors
from common.model.trainable import load_trainable_state, trainable_state
from common.runfolder import RunFolder
from simulations.demo_data import write_demo_hospitals

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "simulations", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_tiny_federation_with_dp_learns_and_saves_a_reloadable_model(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_demo_hospitals(data, 2, seed=0)
    proc = simulate("--preset", "tiny", "--hospitals", "2", "--rounds", "2", "--seed", "0",
                    "--data-root", str(data), "--output-dir", str(tmp_path / "out"),
                    "--run-name", "e2e")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hospital-1" in proc.stdout and "epsilon" in proc.stdout  # the printed table

    out = tmp_path / "out" / "e2e"
    history = RunFolder(out).read_history()
    assert [h.round for h in history] == [1, 2]
    for h in history:
        assert set(h.sites) == {"hospital-0", "hospital-1"}
        assert all(0 < s.train[R.EPSILON] <= 8.01 for s in h.sites.values())
    assert history[-1].aggregate[R.AUROC] > 0.6

    model = load_model(out)  # rebuilt from model.json, without Flower
    final = trainable_state(model)
    load_trainable_state(model, load_tensors(out / "round-002.safetensors"))
    for name, value in trainable_state(model).items():
        torch.testing.assert_close(value, final[name])


def test_the_report_names_the_hospital_that_failed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_demo_hospitals(data, 2, seed=0, size_scale=0.1)
    manifest = data / "hospital-1" / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    (manifest.parent / rows[2]["image"]).unlink()
    proc = simulate("--preset", "tiny", "--hospitals", "2", "--rounds", "1",
                    "--data-root", str(data), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "hospital-1: bad-data: " in proc.stderr
    assert "manifest.csv:4: image file" in proc.stderr and "does not exist" in proc.stderr
