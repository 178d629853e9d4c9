"""Structured fields through a site's round: trained under DP-SGD and charged in the ledger;
a tabular-only site and an image-only site each train only what their data reaches."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

from client.rounds import train_round
from client.state import SiteState
from common.model.trainable import trainable_state
from common.privacy.ledger import load_ledger
from common.privacy.receipts import read_receipts
from tests.conftest import hospital, request, tiny_run

SCHEMA = "age:numeric:0:120;sex:categorical:F|M"


def with_fields(source: Path, target: Path, *, keep: tuple[str, ...] = ("image", "text")) -> Path:
    """A copy of a demo manifest with age and sex (about a fifth missing) and only the `keep`
    modalities; images point back at the source folder."""
    with (source / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rng = random.Random(0)
    for row in rows:
        row["image"] = str(source / row["image"]) if "image" in keep else ""
        row["text"] = row["text"] if "text" in keep else ""
        row["age"] = "" if rng.random() < 0.2 else str(rng.randint(20, 90))
        row["sex"] = "" if rng.random() < 0.2 else rng.choice("FM")
        if "tabular" not in keep and keep:
            row["age"] = row["sex"] = ""
        if not keep:  # fields only: at least one present per row
            row["age"] = row["age"] or "50"
    target.mkdir(parents=True)
    with (target / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


@pytest.mark.parametrize(
    ("keep", "untrained_prefixes", "trained_prefixes"),
    [
        (("image", "text", "tabular"), (), ("tabular.", "fusion.tabular_norm", "head.")),
        ((), ("fusion.image_norm", "fusion.text_norm"), ("tabular.", "fusion.missing_image")),
        (("image",), ("tabular.", "fusion.tabular_norm"), ("fusion.missing_tabular",)),
    ],
    ids=["three-modalities", "tabular-only", "image-only"],
)
def test_a_site_trains_its_fields_under_dp_and_is_charged(
    demo_root: Path,
    tmp_path: Path,
    keep: tuple[str, ...],
    untrained_prefixes: tuple[str, ...],
    trained_prefixes: tuple[str, ...],
) -> None:
    data = with_fields(demo_root / "hospital-0", tmp_path / "site", keep=keep)
    run = tiny_run(demo_root, tabular_fields=SCHEMA, local_steps=2, num_server_rounds=2)
    state = SiteState(hospital(tmp_path, tmp_path / "state", 0, manifest=data))
    start = trainable_state(state.bundle(run.model).model)
    outcome = train_round(state, run, request(state, run, 1, run_key="tab"))

    assert outcome.account is not None and outcome.account.epsilon > 0  # DP-SGD, accounted
    entry = load_ledger(state.site.state_dir).run("tab")
    assert entry is not None and entry.rounds == (1,) and entry.unprotected_rounds == ()
    assert [r.round for r in read_receipts(state.site.state_dir)] == [1]
    for prefix in untrained_prefixes:
        assert any(n.startswith(prefix) for n in outcome.untrained), prefix
        assert not any(n.startswith(prefix) for n in outcome.state), prefix
    for prefix in trained_prefixes:
        moved = [n for n in outcome.state if n.startswith(prefix)]
        assert moved and all(not torch.equal(outcome.state[n], start[n]) for n in moved), prefix


def blank(manifest: Path, *columns: str) -> None:
    """Empty these columns in every row (a site without those modalities)."""
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.update(dict.fromkeys(columns, ""))
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.slow
def test_tabular_only_and_image_only_sites_join_a_three_modality_federation(
    demo_root: Path, tmp_path: Path
) -> None:
    """The real ServerApp and ClientApp in one process; the demo data carries the fields."""
    import shutil

    import numpy as np
    from flwr.app import Message

    from client.app import app as client_app
    from common import protocol as R
    from common.model.checkpoint import load_tensors
    from common.runfolder import RunFolder
    from server.app import run_federation
    from simulations.demo_data import DEMO_TABULAR_FIELDS
    from simulations.inprocess import InProcessGrid
    from tests.conftest import tiny_user_config

    data = tmp_path / "data"
    for i in range(3):
        shutil.copytree(demo_root / f"hospital-{i}", data / f"hospital-{i}")
    blank(data / "hospital-1" / "manifest.csv", "image", "text")  # structured fields only
    blank(data / "hospital-2" / "manifest.csv", "text", "age", "sex", "temp", "spo2")  # images
    settings = {
        "output-dir": str(tmp_path / "out"),
        "run-name": "three",
        "num-server-rounds": 1,
        "state-root": str(tmp_path / "state"),
        "fraction-evaluate": 0.0,
        "tabular-fields": DEMO_TABULAR_FIELDS,
        "local-steps": 2,
    }
    sent: dict[int, tuple[dict[str, np.ndarray], int]] = {}

    def tap(node: int, msg: Message) -> None:
        if not msg.has_error() and R.ARRAYS in msg.content:
            arrays = {k: v.numpy().copy() for k, v in msg.content[R.ARRAYS].items()}
            sent[node] = (arrays, int(msg.content[R.METRICS][R.NUM_EXAMPLES]))

    grid = InProcessGrid(
        client_app,
        [{"partition-id": i, "num-partitions": 3} for i in range(3)],
        tiny_user_config(data, **settings),
        tap=tap,
    )
    out = run_federation(grid, tiny_run(data, **settings))
    assert RunFolder(out).read_summary().status == "completed"
    (history,) = RunFolder(out).read_history()
    assert set(history.sites) == {"hospital-0", "hospital-1", "hospital-2"}
    assert not history.failures and not history.refusals and not history.rejected

    full, fields_only, images_only = (sent[n] for n in sorted(sent))
    assert "tabular.mix.weight" in fields_only[0] and "tabular.mix.weight" not in images_only[0]
    assert "fusion.image_norm.weight" not in fields_only[0]
    # a parameter is averaged over the sites that trained it (FedAvg by examples)
    saved = {k: v.numpy() for k, v in load_tensors(out / "round-001.safetensors").items()}
    for name in ("tabular.mix.weight", "head.weight"):
        trained = [s for s in (full, fields_only, images_only) if name in s[0]]
        expected = np.average(
            [s[0][name] for s in trained], axis=0, weights=[s[1] for s in trained]
        )
        np.testing.assert_allclose(saved[name], expected, rtol=1e-5, atol=1e-6)
