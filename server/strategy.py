"""Flower's strategies, extended (not copied): screen updates, record replies, stop cleanly, resume.

`build_strategy` takes the Flower strategy named by the run config's `strategy` (FedAvg, FedProx,
FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum, MultiKrum) and puts `FederationMixin` in front
of it. The mixin, before Flower aggregates a round: hands every reply to the RunRecorder, rejects
malformed or out-of-bound updates (`server.updates`), stops the run when fewer than `min-nodes`
updates are left, and completes partial updates. Aggregation itself is Flower's. Metric
aggregation is ours: weighted means that skip non-finite values, with the per-site privacy metrics
left out (they are recorded per site in history.jsonl, never averaged).

A resumed run starts Flower's round loop again at 1; the mixin shifts every round number by
`round_offset` (the rounds already finished), so sites, history and FedAdam's bias correction see
the true round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from common import records as R
from common.config import AggregationConfig, FederationConfig
from server.history import RunRecorder, weighted_mean
from server.updates import Update, UpdateBounds, complete_partial_updates, screen_updates

log = logging.getLogger(__name__)

FLOWER_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
    "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum,
}


class NotEnoughSites(RuntimeError):
    """Fewer sites than `min-nodes` trained in a round; the run ends there."""

    def __init__(self, server_round: int, message: str) -> None:
        super().__init__(message)
        self.server_round = server_round


def aggregate_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of each non-privacy metric over the sites that report a finite value."""
    rows = [dict(next(iter(c.metric_records.values()))) for c in contents]
    keys = [k for k in rows[0] if k not in (weight_key, *R.PRIVACY_METRICS)]
    return MetricRecord({k: float(weighted_mean(rows, k)) for k in keys})


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


class FederationMixin:
    """Goes in front of a Flower strategy (FedAvg or a subclass); see the module docstring."""

    min_train_nodes: int

    def __init__(self, recorder: RunRecorder, bounds: UpdateBounds, round_offset: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(train_metrics_aggr_fn=aggregate_metrics,  # type: ignore[call-arg]
                         evaluate_metrics_aggr_fn=aggregate_metrics, **kwargs)
        self.recorder, self.bounds, self.round_offset = recorder, bounds, round_offset
        self._global: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember the global parameters the updates are screened against."""
        self._global = _numpy(arrays)
        return super().configure_train(  # type: ignore[misc]
            server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record, screen, check enough sites are left, complete partial updates, aggregate."""
        server_round += self.round_offset
        replies = list(replies)
        self.recorder.record_replies(replies)
        ok = [m for m in replies if not m.has_error()]
        updates = [self._update(m) for m in ok]
        screening = screen_updates(updates, self._global, self.bounds)
        for site, reason in screening.rejected.items():
            self.recorder.reject(site, reason)
        kept = {id(u) for u in screening.accepted}  # by identity: two nodes may share a name
        accepted = [m for m, u in zip(ok, updates, strict=True) if id(u) in kept]
        if len(accepted) < self.min_train_nodes:
            raise NotEnoughSites(server_round, (
                f"Round {server_round}: {len(accepted)} site(s) sent a usable update, fewer than "
                f"min-nodes={self.min_train_nodes}. "
                + self._explain([m for m in replies if m.has_error()], screening.rejected)))
        full = complete_partial_updates(screening.accepted, self._global)
        for msg, update, arrays in zip(accepted, screening.accepted, full, strict=True):
            if update.untrained:  # only a partial update needs repacking (saves a serialisation)
                msg.content[R.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        aggregated, metrics = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
        if aggregated is not None:  # FedAdam/FedYogi compute in float64: keep the model's dtypes
            aggregated = ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=self._global[k].dtype))
                                      for k, v in aggregated.items()})
        return aggregated, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """As Flower's, with the true round number."""
        return super().configure_evaluate(  # type: ignore[misc]
            server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record the replies, then aggregate as Flower does."""
        replies = list(replies)
        self.recorder.record_replies(replies)
        return super().aggregate_evaluate(server_round + self.round_offset, replies)  # type: ignore[misc]

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The server optimiser's moments (FedAdam/FedYogi), to checkpoint with each round."""
        if not isinstance(self, FedOpt):
            return {}
        return {f"{name}/{k}": v for name in ("m_t", "v_t")
                for k, v in (getattr(self, name) or {}).items()}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `optimizer_state` returned (resume)."""
        if isinstance(self, FedOpt) and state:
            for name in ("m_t", "v_t"):
                setattr(self, name, {k.split("/", 1)[1]: v for k, v in state.items()
                                     if k.startswith(f"{name}/")})

    def _update(self, msg: Message) -> Update:
        content = msg.content
        declared = content[R.UPDATE][R.UNTRAINED] if R.UPDATE in content.config_records else []
        arrays = _numpy(content[R.ARRAYS]) if R.ARRAYS in content.array_records else {}
        metrics = next(iter(content.metric_records.values()), {})
        return Update(site=self.recorder.site_name(msg), arrays=arrays,
                      untrained=tuple(str(x) for x in declared),  # type: ignore[union-attr]
                      num_examples=int(metrics.get(R.NUM_EXAMPLES, 0)))

    def _explain(self, errors: list[Message], rejected: dict[str, str]) -> str:
        """Refusals, failures and rejected updates, each reason naming its site."""
        def reason(m: Message) -> str:
            text = m.error.reason
            return text if R.site_of_error_reason(text) else f"{self.recorder.site_name(m)}: {text}"

        refused = [reason(m) for m in errors if R.is_refusal(m.error.reason)]
        failed = [reason(m) for m in errors if not R.is_refusal(m.error.reason)]
        parts = [f"Refused: {'; '.join(refused)}" if refused else "",
                 f"Failed: {'; '.join(failed)}" if failed else "",
                 "Rejected: " + "; ".join(f"{s}: {r}" for s, r in rejected.items()) if rejected else ""]
        return " ".join(p for p in parts if p) or "No replies before the round timeout."


def _strategy_options(agg: AggregationConfig) -> dict[str, Any]:
    """The chosen Flower strategy's own settings."""
    return {
        "fedprox": {"proximal_mu": agg.proximal_mu},
        "fedadam": {"eta": agg.server_learning_rate},
        "fedyogi": {"eta": agg.server_learning_rate},
        "fedtrimmedavg": {"beta": agg.trim_fraction},
        "krum": {"num_malicious_nodes": agg.byzantine_sites},
        "multikrum": {"num_malicious_nodes": agg.byzantine_sites,
                      "num_nodes_to_select": agg.multikrum_select},
    }.get(agg.strategy, {})


def build_strategy(fed: FederationConfig, agg: AggregationConfig, recorder: RunRecorder,
                   round_offset: int = 0) -> FederationMixin:
    """The Flower strategy named by `agg.strategy` with FederationMixin in front of it."""
    base = FLOWER_STRATEGIES[agg.strategy]
    cls = type(f"Federation{base.__name__}", (FederationMixin, base), {})
    return cls(recorder, UpdateBounds(agg.max_update_norm, agg.update_norm_factor), round_offset,
               fraction_train=fed.fraction_train,
               fraction_evaluate=fed.fraction_evaluate,
               min_train_nodes=fed.min_nodes,
               min_evaluate_nodes=fed.min_nodes if fed.fraction_evaluate > 0 else 0,
               min_available_nodes=fed.min_nodes,
               **_strategy_options(agg))
