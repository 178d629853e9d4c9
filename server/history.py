"""The run's record on disk: per-round checkpoints and `history.jsonl`, one line per round.

A history line: {"round": r, "sites": {name: {train and evaluate metrics, epsilon included}},
"aggregate": {weighted means of the non-privacy metrics}, "failures": {name: reason}}.
Privacy metrics are per site only: an average epsilon over sites would guarantee nothing.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from common import records as R
from common.checkpoint import atomic_write_bytes, save_tensors

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"


def round_checkpoint(out_dir: Path, server_round: int) -> Path:
    """Where the global trainable state after `server_round` is saved."""
    return out_dir / f"round-{server_round:03d}.safetensors"


def _json_number(value: float | int) -> float | int | None:
    """JSON has no inf/nan: write null (epsilon is inf without DP, AUROC nan on one class)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def weighted_mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of `key` weighted by num-examples over rows with a finite value (nan if none)."""
    pairs = [(r[key], r[R.NUM_EXAMPLES]) for r in rows
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and r[R.NUM_EXAMPLES] > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


class RunRecorder:
    """Collects per-site replies of each round and writes checkpoints and history."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._sites: dict[str, dict[str, Any]] = {}
        self._failures: dict[str, str] = {}
        self._names: dict[int, str] = {}  # node id -> site name, learned from replies

    def site_name(self, msg: Message) -> str:
        """The name a site reported (remembered per node), else `node-<id>`."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            named = R.site_of_error_reason(msg.error.reason)
            if named:
                self._names[node] = named
        elif R.SITE in msg.content:
            self._names[node] = str(msg.content[R.SITE][R.SITE_NAME])
        return self._names.get(node, f"node-{node}")

    def record_replies(self, replies: list[Message]) -> None:
        """Remember each site's metrics, or its failure reason."""
        for msg in replies:
            name = self.site_name(msg)
            if msg.has_error():
                self._failures[name] = msg.error.reason
                log.warning("site %s failed: %s", name, msg.error.reason)
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            self._sites.setdefault(name, {}).update(dict(metrics))

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Checkpoint the global trainable state and append the round to history.jsonl.

        Used as the strategy's `evaluate_fn`, which Flower calls after every round (and once
        before the first, with round 0, which has nothing to record).
        """
        if server_round == 0:
            return None
        save_tensors(round_checkpoint(self.out_dir, server_round), arrays.to_torch_state_dict())
        rows = list(self._sites.values())
        aggregate = {key: weighted_mean(rows, key) for key in (R.TRAIN_LOSS, *R.EVAL_METRICS)
                     if key != R.NUM_EXAMPLES}
        line = {
            "round": server_round,
            "sites": {name: {k: _json_number(v) for k, v in m.items()}
                      for name, m in sorted(self._sites.items())},
            "aggregate": {k: _json_number(v) for k, v in aggregate.items()},
            "failures": dict(sorted(self._failures.items())),
        }
        path = self.out_dir / HISTORY
        previous = path.read_bytes() if path.exists() else b""
        atomic_write_bytes(path, previous + (json.dumps(line) + "\n").encode())
        self._log_round(server_round, line)
        self._sites, self._failures = {}, {}
        return None

    @staticmethod
    def _log_round(server_round: int, line: dict[str, Any]) -> None:
        for name, m in line["sites"].items():
            eps = m.get(R.EPSILON)
            log.info("round %d  %-14s loss %s  auroc %s  epsilon %s", server_round, name,
                     _fmt(m.get(R.LOSS)), _fmt(m.get(R.AUROC)), "off" if eps is None else _fmt(eps))
        agg = line["aggregate"]
        log.info("round %d  %-14s loss %s  auroc %s", server_round, "(aggregate)",
                 _fmt(agg.get(R.LOSS)), _fmt(agg.get(R.AUROC)))


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def read_history(out_dir: Path) -> list[dict[str, Any]]:
    """All rounds recorded in `out_dir/history.jsonl`."""
    path = out_dir / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
