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
    """Fewer sites than `min-nodes` trained in a round; the run ends there."""

    def __init__(self, server_round: int, message: str) -> None:
        super().__init__(message)
        self.server_round = server_round


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
            raise NotEnoughSites(server_round, (
                f"Round {server_round}: {len(ok)} site(s) trained, fewer than min-nodes="
                f"{self.min_train_nodes}. " + self._explain([m for m in replies if m.has_error()])))
        return super().aggregate_train(server_round, replies)

    def _explain(self, errors: list[Message]) -> str:
        """Refusals and failures, each reason naming its site."""
        def reason(m: Message) -> str:
            text = m.error.reason
            return text if R.site_of_error_reason(text) else f"{self.recorder.site_name(m)}: {text}"

        refused = [reason(m) for m in errors if R.is_refusal(m.error.reason)]
        failed = [reason(m) for m in errors if not R.is_refusal(m.error.reason)]
        parts = [f"Refused: {'; '.join(refused)}" if refused else "",
                 f"Failed: {'; '.join(failed)}" if failed else ""]
        return " ".join(p for p in parts if p) or "No replies before the round timeout."

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record the replies, then aggregate as FedAvg does."""
        replies = list(replies)
        self.recorder.record_replies(replies)
        return super().aggregate_evaluate(server_round, replies)
