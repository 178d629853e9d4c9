"""Flower's strategies, as Flower ships them, chosen by the run config's `strategy`.

FedAvg, FedAvgM (server momentum), FedProx, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum and
MultiKrum, built with their own settings and one metric aggregation of ours: weighted means that
skip non-finite values, with the per-site privacy metrics left out (they are recorded per site,
never averaged). The round loop (`server.loop`) calls their `configure_*` and `aggregate_*` methods;
screening, recording and checkpointing are the loop's, around them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, MetricRecordValues, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from common import protocol as R
from common.config import AggregationConfig, FederationConfig

FLOWER_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
}
NOT_AVERAGED = (R.NUM_EXAMPLES, R.TRAIN_SECONDS, *R.PRIVACY_METRICS)


def _number(value: MetricRecordValues) -> float:
    """A scalar metric; a list cannot be averaged (TypeError, as `math.isfinite` raised)."""
    if isinstance(value, list):
        raise TypeError(f"must be real number, not {type(value).__name__}")
    return value


def weighted_means(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of each averaged metric over the replies with a finite value (nan if none)."""
    # `server.replies` passes on only replies whose `metrics` record is a MetricRecord
    rows = [dict(c.metric_records[R.METRICS]) for c in contents]
    out: dict[str, MetricRecordValues] = {}
    for key in (k for k in rows[0] if k not in NOT_AVERAGED):
        pairs: list[tuple[float, float]] = []
        for r in rows:
            value = _number(r[key])
            if math.isfinite(value):
                pairs.append((value, _number(r[weight_key])))
        total = sum(w for _, w in pairs)
        out[key] = float(sum(v * w for v, w in pairs) / total) if total else math.nan
    return MetricRecord(out)


def _options(agg: AggregationConfig) -> dict[str, Any]:
    """The chosen Flower strategy's own settings."""
    options: dict[str, dict[str, Any]] = {
        "fedprox": {"proximal_mu": agg.proximal_mu},
        "fedavgm": {
            "server_learning_rate": agg.server_learning_rate,
            "server_momentum": agg.server_momentum,
        },
        "fedadam": {"eta": agg.server_learning_rate},
        "fedyogi": {"eta": agg.server_learning_rate},
        "fedtrimmedavg": {"beta": agg.trim_fraction},
        "krum": {"num_malicious_nodes": agg.byzantine_sites},
        "multikrum": {
            "num_malicious_nodes": agg.byzantine_sites,
            "num_nodes_to_select": agg.multikrum_select,
        },
    }
    return options.get(agg.strategy, {})


def build_strategy(fed: FederationConfig, agg: AggregationConfig) -> FedAvg:
    """The Flower strategy named by `agg.strategy`, with the federation's sampling settings."""
    return FLOWER_STRATEGIES[agg.strategy](
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_nodes,
        min_evaluate_nodes=fed.min_nodes if fed.fraction_evaluate > 0 else 0,
        min_available_nodes=fed.min_nodes,
        weighted_by_key=R.NUM_EXAMPLES,
        arrayrecord_key=R.ARRAYS,
        configrecord_key=R.CONFIG,
        train_metrics_aggr_fn=weighted_means,
        evaluate_metrics_aggr_fn=weighted_means,
        **_options(agg),
    )


def optimizer_state(strategy: FedAvg) -> dict[str, np.ndarray]:
    """Server optimiser moments (FedAdam/FedYogi; FedAvgM's momentum), to checkpoint each round."""
    if isinstance(strategy, FedAvgM):
        current = strategy.current_arrays
        if strategy.momentum_vector is None or current is None:
            return {}
        return {
            f"momentum/{k}": v
            for k, v in zip(current.keys(), strategy.momentum_vector, strict=True)
        }
    if not isinstance(strategy, FedOpt):
        return {}
    return {
        f"{name}/{k}": v
        for name in ("m_t", "v_t")
        for k, v in (getattr(strategy, name) or {}).items()
    }


def load_optimizer_state(
    strategy: FedAvg, state: dict[str, np.ndarray], arrays: ArrayRecord | None = None
) -> None:
    """Restore what `optimizer_state` returned (resume); FedAvgM also needs the global `arrays`."""
    if isinstance(strategy, FedAvgM) and state and arrays is not None:
        # FedAvgM keeps its momentum as a list in the order of its current arrays
        strategy.current_arrays = arrays
        strategy.momentum_vector = [state[f"momentum/{k}"] for k in arrays]
    if isinstance(strategy, FedOpt) and state:
        for name in ("m_t", "v_t"):
            setattr(
                strategy,
                name,
                {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")},
            )
