"""End to end: a hospital without reports and one without images train together (tiny preset).

Runs the real ServerApp and ClientApp in one process (simulations/inprocess.py). Each site
sends only the parameters its data can train; the server averages each parameter over the sites
that trained it.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from client.app import app as client_app
from common import protocol as R
from common.model.checkpoint import load_tensors
from common.model.fusion_model import build_model
from common.model.trainable import trainable_names
from common.runfolder import RunFolder
from server.app import run_federation
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_run, tiny_user_config


def blank_column(manifest: Path, column: str) -> None:
    """Empty one column in every row of a manifest (a site without that modality)."""
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row[column] = ""
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.slow
def test_sites_missing_a_modality_both_contribute(demo_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(2):
        shutil.copytree(demo_root / f"hospital-{i}", data / f"hospital-{i}")
    blank_column(data / "hospital-0" / "manifest.csv", "text")  # images only
    blank_column(data / "hospital-1" / "manifest.csv", "image")  # reports only
    settings = {
        "output-dir": str(tmp_path / "out"),
        "run-name": "mm",
        "num-server-rounds": 1,
        "state-root": str(tmp_path / "state"),
        "trainable-text-layers": 1,
        "trainable-image-blocks": 1,
        "fraction-evaluate": 0.0,
        "local-steps": 2,  # what each site trains, not how well: DP steps through encoder layers
    }
    sent: dict[int, list[tuple[dict[str, np.ndarray], list[str], int]]] = {1: [], 2: []}

    def tap(node: int, msg: Message) -> None:
        if not msg.has_error() and R.ARRAYS in msg.content:  # copy: the server completes it later
            c = msg.content
            sent[node].append(
                (
                    {k: v.numpy().copy() for k, v in c[R.ARRAYS].items()},
                    list(c[R.UPDATE][R.UNTRAINED]),
                    int(c[R.METRICS][R.NUM_EXAMPLES]),
                )
            )

    grid = InProcessGrid(
        client_app,
        [{"partition-id": i, "num-partitions": 2} for i in range(2)],
        tiny_user_config(data, **settings),
        tap=tap,
    )
    out = run_federation(grid, tiny_run(data, **settings))

    assert RunFolder(out).read_summary().status == "completed"
    for h in RunFolder(out).read_history():
        assert set(h.sites) == {"hospital-0", "hospital-1"}
        assert not h.failures and not h.refusals and not h.rejected
    names = trainable_names(build_model(tiny_run(data, **settings).model))
    (images_sent, images_untrained, n_images), (texts_sent, texts_untrained, n_texts) = (
        sent[1][0],
        sent[2][0],
    )
    # the image-only site trains no text layer and no text norm; the text-only site the reverse
    assert any(n.startswith("text.encoder.layer.1.") for n in images_untrained)
    assert {"fusion.text_norm.weight", "fusion.missing_image.table.weight"} <= set(images_untrained)
    assert any(n.startswith("image.layer4.") for n in texts_untrained)
    assert {"fusion.image_norm.weight", "fusion.missing_text.table.weight"} <= set(texts_untrained)
    for arrays, untrained in ((images_sent, images_untrained), (texts_sent, texts_untrained)):
        assert list(arrays) == [n for n in names if n not in untrained]

    # round 1: a parameter one site trained is that site's value; a shared one is FedAvg's mean
    saved = {k: v.numpy() for k, v in load_tensors(out / "round-001.safetensors").items()}
    only_images = [n for n in names if n in images_sent and n not in texts_sent]
    only_texts = [n for n in names if n in texts_sent and n not in images_sent]
    both = [n for n in names if n in images_sent and n in texts_sent]
    assert only_images and only_texts and "head.weight" in both
    for n in only_images:
        np.testing.assert_allclose(saved[n], images_sent[n], rtol=1e-6, atol=1e-7)
    for n in only_texts:
        np.testing.assert_allclose(saved[n], texts_sent[n], rtol=1e-6, atol=1e-7)
    for n in both:
        expected = np.average([images_sent[n], texts_sent[n]], axis=0, weights=[n_images, n_texts])
        np.testing.assert_allclose(saved[n], expected, rtol=1e-5, atol=1e-6)
