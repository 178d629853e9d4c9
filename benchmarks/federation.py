"""A federation in this process for the utility benchmarks: the project's own rounds, no transport.

Each round runs what a deployed run runs, minus Flower's messaging: the coordinator's strategy
(`server.strategy.build_strategy`, chosen by the run config: FedAvg, FedAvgM, FedAdam, ...)
samples the sites and builds the round's message; every sampled site trains through its own
round (`client.rounds.train_round`: feature cache, DP-SGD, ledger, receipts); partial updates are
completed as the coordinator completes them (`server.screening.complete_partial_updates`); and
the strategy aggregates (`aggregate_train`, weighted by training examples). The global state
passed to the next round is the strategy's aggregate of complete updates, never a site's update.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch.utils.data import DataLoader

from client.rounds import RoundRequest, train_round
from client.site_config import SiteConfig
from client.state import SiteState
from common import protocol as R
from common.config import RunConfig
from common.model.feature_cache import CachedFusion, CacheKey
from common.model.fusion_model import FusionModel, build_model
from common.model.trainable import load_trainable_state, trainable_state
from common.training.loop import predict_logits
from server.screening import Update, complete_partial_updates
from server.strategy import build_strategy

State = dict[str, torch.Tensor]


class LocalNodes:
    """The node ids Flower's strategies sample from (the only part of a Grid they use here)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(range(1, self.count + 1))


def site_states(root: Path, folders: list[Path], policy: Path | None = None) -> list[SiteState]:
    """One warm site per folder, its state (ledger, receipts) under `root`/<folder name>.

    Without `policy` a site is a simulated hospital that the researcher plays: it trains with or
    without DP as each run asks, each run under its own budget (`SitePolicy.researcher`).
    """
    return [SiteState(SiteConfig(site_name=f.name, manifest=f, state_dir=root / f.name,
                                 policy=policy, simulated=policy is None))
            for f in folders]


def federate(run: RunConfig, sites: list[SiteState], start: State, run_key: str) -> State:
    """`num-server-rounds` rounds of the run config's strategy over `sites`; the final global state.

    Each call is its own Flower run (the sites' ledgers bind one run key to one Flower run), so
    warm sites (their feature caches) serve many settings, each under its own run key.
    """
    flower_run_id = zlib.crc32(run_key.encode()) + 1
    # the process's task identity, as a ServerApp's runtime sets it (Flower's Message needs one)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = flower_run_id, 0, 1
    # a federation of one (centralized, a hospital alone) waits for no second node
    fed = replace(run.federation, min_nodes=min(run.federation.min_nodes, len(sites)))
    strategy = build_strategy(fed, run.aggregation)
    nodes = LocalNodes(len(sites))
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in start.items()})
    for server_round in range(1, run.federation.num_server_rounds + 1):
        fingerprint = sites[0].bundle(run.model).fingerprint
        config = ConfigRecord({R.RUN_KEY: run_key, R.FROZEN_FINGERPRINT: fingerprint})
        messages = list(strategy.configure_train(server_round, arrays, config, nodes))  # type: ignore[arg-type]
        updates = []
        for msg in messages:
            site = sites[msg.metadata.dst_node_id - 1]
            request = RoundRequest(server_round=server_round, run_key=run_key,
                                   frozen_fingerprint=fingerprint,
                                   parameters=msg.content[R.ARRAYS].to_torch_state_dict(),
                                   flower_run_id=flower_run_id)
            out = train_round(site, run, request)
            updates.append(Update(site=site.site.site_name,
                                  arrays={k: v.numpy() for k, v in out.state.items()},
                                  untrained=out.untrained, num_examples=out.num_examples))
        global_arrays = {k: v.numpy() for k, v in arrays.items()}
        replies = [Message(RecordDict({R.ARRAYS: ArrayRecord({k: Array(v) for k, v in full.items()}),
                                       R.METRICS: MetricRecord({R.NUM_EXAMPLES: u.num_examples})}),
                           dst_node_id=0, message_type="train")
                   for full, u in zip(complete_partial_updates(updates, global_arrays), updates,
                                      strict=True)]
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is None:
            raise RuntimeError(f"round {server_round}: the strategy aggregated nothing.")
        arrays = ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=global_arrays[k].dtype))
                              for k, v in aggregated.items()})
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}


def initial_state(run: RunConfig) -> State:
    """The run's initial global trainable parameters (a fresh model, as the run's seed builds it)."""
    return trainable_state(build_model(run.model))


def test_probabilities(run: RunConfig, test_site: SiteState, state: State) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) and labels (N,) of `state` on `test_site`'s rows (frozen part cached).

    The test site's rows must all be in its training split (a manifest whose rows say `split=train`):
    they are read as the site reads training rows, and never trained on here.
    """
    bundle, data = test_site.bundle(run.model), test_site.data(run)
    model: FusionModel = bundle.model
    load_trainable_state(model, state)
    key = CacheKey.for_model(run.model, dataset_sha256=data.version, split="test",
                             frozen_fingerprint=bundle.fingerprint)
    features = test_site.features.get(key, model, data.train, torch.device("cpu"))
    logits, labels = predict_logits(CachedFusion(model), DataLoader(features, batch_size=256),
                                    torch.device("cpu"))
    return torch.softmax(logits, dim=-1).numpy(), labels.numpy()
