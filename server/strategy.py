"""Flower's FedAvg, extended (not copied) to record each site's replies and to stop cleanly.

Aggregation itself is Flower's: parameters are averaged weighted by `num-examples`. Metric
aggregation is ours: weighted means that skip non-finite values, with the per-site privacy
metrics left out (they are recorded per site in history.jsonl, never averaged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common import records as R
from server.history import RunRecorder, weighted_mean

log = logging.getLogger(__name__)


class NotEnoughSites(RuntimeError):
    """Fewer sites than `min-nodes` replied successfully; the run cannot continue."""


def aggregate_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of each non-privacy metric over the sites that report a finite value."""
    rows = [dict(next(iter(c.metric_records.values()))) for c in contents]
    keys = [k for k in rows[0] if k not in (weight_key, *R.PRIVACY_METRICS)]
    return MetricRecord({k: float(weighted_mean(rows, k)) for k in keys})


class RecordingFedAvg(FedAvg):
    """FedAvg that hands every reply to a RunRecorder and enforces a minimum of sites."""

    def __init__(self, recorder: RunRecorder, **kwargs: object) -> None:
        super().__init__(train_metrics_aggr_fn=aggregate_metrics,
                         evaluate_metrics_aggr_fn=aggregate_metrics, **kwargs)
        self.recorder = recorder

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies, check enough sites trained, then aggregate as FedAvg does."""
        replies = list(replies)
        self.recorder.record_replies(replies)
        ok = [m for m in replies if not m.has_error()]
        if len(ok) < self.min_train_nodes:
            reasons = "; ".join(m.error.reason if R.site_of_error_reason(m.error.reason)
                                else f"{self.recorder.site_name(m)}: {m.error.reason}"
                                for m in replies if m.has_error()) or "no replies before the timeout"
            raise NotEnoughSites(
                f"Round {server_round}: {len(ok)} site(s) trained, fewer than min-nodes="
                f"{self.min_train_nodes}. Failures: {reasons}")
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record the replies, then aggregate as FedAvg does."""
        replies = list(replies)
        self.recorder.record_replies(replies)
        return super().aggregate_evaluate(server_round, replies)
