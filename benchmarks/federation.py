"""How the utility benchmarks train and judge a model: every setting is one run of the product.

A setting is a whole ServerApp run (`server.app.federate`: the round loop
`server.loop.run_rounds` with its reply checks, update screening, weight cap, each round's
evaluation and the run folder) on an in-process grid of the installed ClientApp
(`simulations.inprocess`): no part of a round is re-implemented here. Every site is a deployed
hospital's node (`Hospitals.node`: its manifest, its own state folder) under `POLICY`: a
deployed site's default policy with the two changes the comparisons need. Each setting is its
own run (its own run key and Flower run), and the sites stay warm across settings in the
ClientApp's registry, so their frozen features are computed once. A model is judged on a
patient-level test set that no hospital sees (`test_probabilities`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from client.site_config import SiteConfig
from client.state import SiteState
from common.config import RunConfig
from common.model.checkpoint import MODEL_WEIGHTS
from common.model.feature_cache import CachedFusion, CacheKey
from common.model.fusion_model import FusionModel, build_model
from common.model.trainable import load_trainable_state, trainable_state
from common.training.loop import predict_logits
from simulations.inprocess import run_in_process, warm_site

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]

# A deployed site's defaults (epsilon cap 8 per run; evaluation released as noisy score counts
# charged to the run's budget, with evaluation-share 0.1 of it planned for them when the run
# starts), except two things the benchmarks' comparisons need: a run may train without DP (the
# settings without DP), and each run has a budget of its own (every setting is a new run on
# the same data).
POLICY = """\
require-dp = false
budget-scope = "run"
"""
POLICY_FILE = "policy.toml"


class Hospitals:
    """A benchmark's sites as deployed nodes: their state folders and run folders under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.policy = root / POLICY_FILE
        root.mkdir(parents=True, exist_ok=True)
        self.policy.write_text(POLICY)

    def node(self, folder: Path) -> dict[str, Any]:
        """The node config of the hospital that reads `folder` (named after it)."""
        return {
            "site-name": folder.name,
            "manifest": str(folder),
            "state-dir": str(self.root / "state" / folder.name),
            "policy": str(self.policy),
        }

    def warm(self, folder: Path, user_config: Mapping[str, Any]) -> tuple[RunConfig, SiteState]:
        """The run as that hospital runs it, the state its ClientApp keeps (to fill its cache)."""
        return warm_site(self.node(folder), user_config)

    def federate(self, user_config: Mapping[str, Any], folders: list[Path], name: str) -> State:
        """Setting `name`: a run over the hospitals of `folders`; the final global trainable state.

        A run that stops early (fewer usable updates than min-nodes) raises: its model is not
        what the setting trains.
        """
        runs = self.root / "runs"
        shutil.rmtree(runs / name, ignore_errors=True)  # a new run, also in a reused --work-dir
        config = {
            **user_config,
            "output-dir": str(runs),
            "run-name": name,
            # a federation of one (centralized, a hospital alone) waits for no second node
            "min-nodes": min(int(user_config["min-nodes"]), len(folders)),
        }
        end = run_in_process(config, [self.node(f) for f in folders])
        if end.stopped:
            raise RuntimeError(f"setting {name}: {end.stopped} (history in {end.folder})")
        # the full model (frozen encoders: 135 MB with the demo preset) of every setting would
        # fill the disk; the trainable state is returned here and kept per round in the folder
        (end.folder / MODEL_WEIGHTS).unlink()
        log.info("setting %s: run folder %s", name, end.folder)
        return {k: v.clone() for k, v in end.arrays.to_torch_state_dict().items()}


def site_states(root: Path, folders: list[Path], policy: Path | None = None) -> list[SiteState]:
    """One site state per folder, outside any federation (a test set, a pool of features).

    Its state (ledger, receipts) is under `root`/<folder name>; without `policy` it is a
    simulated hospital that the researcher plays (`SitePolicy.researcher`).
    """
    return [
        SiteState(
            SiteConfig(
                site_name=f.name,
                manifest=f,
                state_dir=root / f.name,
                policy=policy,
                simulated=policy is None,
            )
        )
        for f in folders
    ]


def initial_state(run: RunConfig) -> State:
    """The run's initial global trainable parameters (a fresh model, as its seed builds it)."""
    return trainable_state(build_model(run.model))


def test_probabilities(
    run: RunConfig, test_site: SiteState, state: State
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C), labels (N,): `state` on `test_site`'s rows (frozen part cached).

    The test site's rows must all be in its training split (every manifest row says `split=train`):
    they are read as the site reads training rows, and never trained on here.
    """
    bundle, data = test_site.bundle(run.model), test_site.data(run)
    model: FusionModel = bundle.model
    load_trainable_state(model, state)
    key = CacheKey.for_model(
        run.model, dataset_sha256=data.version, split="test", frozen_fingerprint=bundle.fingerprint
    )
    features = test_site.features.get(key, model, data.train, torch.device("cpu"))
    logits, labels = predict_logits(
        CachedFusion(model), DataLoader(features, batch_size=256), torch.device("cpu")
    )
    return torch.softmax(logits, dim=-1).numpy(), labels.numpy()
