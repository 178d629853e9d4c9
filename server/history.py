"""The run's record on disk: per-round checkpoints, `history.jsonl` and `summary.json`.

A history line: {"round": r, "sites": {name: {train and evaluate metrics, epsilon included,
"update-sha256"}}, "aggregate": {weighted means of the non-privacy metrics},
"refusals": {name: reason}, "failures": {name: reason}, "rejected": {name: reason}} (rejected:
updates the server screened out, see server.updates). A round that stopped the run has
"stopped": reason instead of "aggregate". Privacy metrics are per site only: an average epsilon
over sites would guarantee nothing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from common import records as R
from common.checkpoint import save_tensors
from common.files import append_line_atomic, atomic_write_bytes
from common.ledger import update_digest
from common.round_views import format_round_table, write_round_views

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"
SUMMARY = "summary.json"
UPDATE_SHA256 = "update-sha256"  # history only: the server's hash of the update it received


def round_checkpoint(out_dir: Path, server_round: int) -> Path:
    """Where the global trainable state after `server_round` is saved."""
    return out_dir / f"round-{server_round:03d}.safetensors"


def optimizer_checkpoint(out_dir: Path, server_round: int) -> Path:
    """Where the server optimiser's state after `server_round` is saved (FedAdam, FedYogi)."""
    return out_dir / f"round-{server_round:03d}.server-optimizer.safetensors"


def _json_value(value: Any) -> Any:
    """JSON has no inf/nan: write null (epsilon is inf without DP, AUROC nan on one class)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def weighted_mean(rows: list[dict[str, Any]], key: str, weight: str = R.NUM_EXAMPLES) -> float:
    """Mean of `key` weighted by `weight` over rows with a finite value (nan if none)."""
    pairs = [(r[key], r[weight]) for r in rows
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
             and isinstance(r.get(weight), (int, float)) and r[weight] > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


class RunRecorder:
    """Collects per-site replies of each round and writes checkpoints, history and summary."""

    def __init__(self, out_dir: Path, initial: ArrayRecord, lines: list[dict[str, Any]] | None = None,
                 optimizer_state: Callable[[], dict[str, np.ndarray]] | None = None) -> None:
        self.out_dir = out_dir
        self.last_arrays = initial  # the global trainable state after the last finished round
        self.lines: list[dict[str, Any]] = list(lines or [])  # a resumed run's finished rounds
        self.optimizer_state = optimizer_state
        self._sites: dict[str, dict[str, Any]] = {}
        self._refusals: dict[str, str] = {}
        self._failures: dict[str, str] = {}
        self._rejected: dict[str, str] = {}
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
        """Remember each site's metrics (and its update's hash), refusal or failure."""
        for msg in replies:
            name = self.site_name(msg)
            if msg.has_error():
                refused = R.is_refusal(msg.error.reason)
                (self._refusals if refused else self._failures)[name] = msg.error.reason
                log.warning("site %s %s: %s", name, "refused" if refused else "failed",
                            msg.error.reason)
                continue
            entry = self._sites.setdefault(name, {})
            entry.update(dict(next(iter(msg.content.metric_records.values()))))
            entry[R.TRAIN_EXAMPLES if msg.content.array_records else R.VAL_EXAMPLES] = entry[R.NUM_EXAMPLES]
            if msg.content.array_records:
                arrays = next(iter(msg.content.array_records.values()))
                entry[UPDATE_SHA256] = update_digest({k: v.numpy() for k, v in arrays.items()})

    def reject(self, site: str, reason: str) -> None:
        """Record that the server screened out a site's update this round."""
        self._rejected[site] = reason
        log.warning("site %s: update rejected: %s", site, reason)

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Checkpoint the global state, then append the round to history.jsonl (its commit).

        Called by the strategy's `evaluate_fn` after every round. A crash before the history
        line is written leaves the round unfinished: a resumed run does it again.
        """
        if self.optimizer_state is not None and (opt := self.optimizer_state()):
            save_tensors(optimizer_checkpoint(self.out_dir, server_round),
                         {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in opt.items()})
        save_tensors(round_checkpoint(self.out_dir, server_round), arrays.to_torch_state_dict())
        self.last_arrays = arrays
        rows = list(self._sites.values())
        # a site's row holds both replies' num-examples under their own names
        aggregate = {R.TRAIN_LOSS: weighted_mean(rows, R.TRAIN_LOSS, R.TRAIN_EXAMPLES)}
        aggregate.update({key: weighted_mean(rows, key, R.VAL_EXAMPLES) for key in R.EVAL_METRICS
                          if key != R.NUM_EXAMPLES})
        self._write_line(server_round, aggregate=aggregate)
        return None

    def stop(self, server_round: int, reason: str) -> None:
        """Record the round that ended the run early (nothing was aggregated)."""
        self._write_line(server_round, stopped=reason)

    def _write_line(self, server_round: int, **extra: Any) -> None:
        line = {
            "round": server_round,
            "sites": {name: {k: _json_value(v) for k, v in m.items()}
                      for name, m in sorted(self._sites.items())},
            **{k: ({kk: _json_value(vv) for kk, vv in v.items()} if isinstance(v, dict) else v)
               for k, v in extra.items()},
            "refusals": self._named(self._refusals),
            "failures": self._named(self._failures),
            "rejected": self._named(self._rejected),
        }
        append_line_atomic(self.out_dir / HISTORY, json.dumps(line))
        self.lines.append(line)
        self._log_round(line)
        write_round_views(self.out_dir, self.lines)  # plots (and TensorBoard events) so far
        self._sites, self._refusals, self._failures, self._rejected = {}, {}, {}, {}

    def _named(self, reasons: dict[str, str]) -> dict[str, str]:
        """Reasons keyed by site name: a crash reply names no site, but a later reply may have."""
        by_node = {f"node-{node}": name for node, name in self._names.items()}
        return dict(sorted((by_node.get(key, key), reason) for key, reason in reasons.items()))

    def write_summary(self, status: str, message: str) -> dict[str, Any]:
        """summary.json: how the run ended and each site's privacy spend (never averaged)."""
        sites: dict[str, dict[str, Any]] = {}
        for line in self.lines:
            for name, m in line["sites"].items():
                s = sites.setdefault(name, _empty_site())
                if R.EPSILON in m:  # a train reply
                    s["rounds_trained"].append(line["round"])
                    s.update(epsilon=m[R.EPSILON], delta=m[R.DELTA],
                             noise_multiplier=m[R.NOISE_MULTIPLIER], steps=m[R.STEPS])
            for name in line["refusals"]:
                sites.setdefault(name, _empty_site())["rounds_refused"].append(line["round"])
            for name in line["failures"]:
                sites.setdefault(name, _empty_site())["rounds_failed"].append(line["round"])
            for name in line.get("rejected", {}):
                sites.setdefault(name, _empty_site())["rounds_rejected"].append(line["round"])
        finished = [line["round"] for line in self.lines if "stopped" not in line]
        summary = {"status": status, "message": message, "rounds_completed": len(finished),
                   "sites": dict(sorted(sites.items()))}
        atomic_write_bytes(self.out_dir / SUMMARY, json.dumps(summary, indent=2).encode())
        return summary

    @staticmethod
    def _log_round(line: dict[str, Any]) -> None:
        log.info("round %d\n%s", line["round"], format_round_table(line))


def _empty_site() -> dict[str, Any]:
    return {"epsilon": None, "delta": None, "noise_multiplier": None, "steps": 0,
            "rounds_trained": [], "rounds_refused": [], "rounds_failed": [],
            "rounds_rejected": []}


def read_history(out_dir: Path) -> list[dict[str, Any]]:
    """All rounds recorded in `out_dir/history.jsonl`."""
    path = out_dir / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(out_dir: Path) -> dict[str, Any] | None:
    """`out_dir/summary.json`, if the run got that far."""
    path = out_dir / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None
