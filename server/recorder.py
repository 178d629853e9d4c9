"""The run's record: each round's checkpoint, then its history line; the summary at the end.

The round loop (`server.loop`) fills a `RoundRecord` as the round goes (each site's replies, its
refusal, failure or rejected update) and hands it to the `Recorder`, which writes the run folder
(`common.runfolder`): the round's checkpoint first, then its history line, which commits the
round (a crash before it leaves the round unfinished, and a resumed run does it again). After
each round the operator's views are redrawn from the whole history (`common.views.round_views`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from common import protocol as R
from common.errors import Kind
from common.model.checkpoint import save_tensors
from common.runfolder import (
    HistoryLine,
    Metrics,
    RunFolder,
    SiteRound,
    Summary,
    recorded,
)
from common.views.round_views import format_round_table, write_round_views
from server.replies import ErrorReply, Replies
from server.sites import SiteNames

log = logging.getLogger(__name__)


class RoundRecord:
    """What one round's history line will say, filled in as the round goes.

    Error replies are named when the line is written: a crash reply names no site, but the same
    node's evaluate reply later in the round does.
    """

    def __init__(self, server_round: int, names: SiteNames) -> None:
        self.server_round, self.names = server_round, names
        self.sites: dict[str, SiteRound] = {}
        self.errors: list[ErrorReply] = []
        self.rejected: dict[str, str] = {}
        self.capped: dict[str, str] = {}

    def add(self, replies: Replies, *, train: bool) -> None:
        """Record a phase's replies: metrics (and the update's hash) per site, and every error."""
        for reply in replies.ok:
            entry = self.sites.get(reply.site, SiteRound(node_id=reply.node_id))
            if train:
                entry = replace(
                    entry,
                    train=recorded(reply.metrics),
                    update_sha256=R.update_digest(reply.update.arrays) if reply.update else None,
                )
            else:
                entry = replace(entry, evaluate=recorded(reply.metrics))
            self.sites[reply.site] = entry
        self.errors += replies.errors
        for site, reason in replies.malformed.items():
            self.reject(site, reason)

    def add_problems(self, replies: Replies) -> None:
        """Record a secure-aggregation stage's refusals, failures and malformed replies."""
        self.errors += replies.errors
        for site, reason in replies.malformed.items():
            self.reject(site, reason)

    def reject(self, site: str, reason: str) -> None:
        """Record that the coordinator screened out a site's update (or reply) this round."""
        self.rejected[site] = reason
        log.warning("site %s: update rejected: %s", site, reason)

    def cap(self, site: str, change: str) -> None:
        """Record that a site's self-reported weight was capped this round."""
        self.capped[site] = change
        log.warning("site %s: %s", site, change)

    @property
    def refusals(self) -> dict[str, str]:
        """Site: reason, for the sites that refused."""
        return self._named(refused=True)

    @property
    def failures(self) -> dict[str, str]:
        """Site: reason, for the sites that failed."""
        return self._named(refused=False)

    def _named(self, *, refused: bool) -> dict[str, str]:
        named: dict[str, str] = {}
        for e in self.errors:  # a site may refuse to train and to evaluate in one round
            if (e.kind is Kind.REFUSAL) == refused:
                site = self.names.name(e.node_id, e.claimed)
                named[site] = f"{named[site]}; {e.text}" if site in named else e.text
        return named

    def line(
        self,
        *,
        aggregate: Metrics | None = None,
        stopped: str | None = None,
        modality_weights: dict[str, float] | None = None,
    ) -> HistoryLine:
        """The round's history line (`modality_weights`: the weighted fusion's, after the round)."""
        return HistoryLine(
            round=self.server_round,
            sites=dict(sorted(self.sites.items())),
            aggregate=aggregate,
            stopped=stopped,
            refusals=self.refusals,
            failures=self.failures,
            rejected=dict(self.rejected),
            capped=dict(self.capped),
            modality_weights=modality_weights,
        )


def aggregate_line(train: MetricRecord | None, evaluate: MetricRecord | None) -> Metrics:
    """The history's aggregate: Flower's aggregated train and evaluate metrics, as recorded."""
    return recorded({**dict(train or {}), **dict(evaluate or {})})


class Recorder:
    """Writes a run's checkpoints, history lines and summary into its run folder."""

    def __init__(self, folder: RunFolder, lines: list[HistoryLine]) -> None:
        self.folder = folder
        self.lines = list(lines)  # the finished rounds (a resumed run's, then this start's)

    def checkpoint(
        self, server_round: int, arrays: ArrayRecord, optimizer_state: Mapping[str, np.ndarray]
    ) -> None:
        """Save the global trainable state after a round (and the server optimiser's)."""
        if optimizer_state:
            save_tensors(
                self.folder.optimizer_checkpoint(server_round),
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in optimizer_state.items()},
            )
        save_tensors(self.folder.round_checkpoint(server_round), arrays.to_torch_state_dict())

    def commit(self, line: HistoryLine) -> None:
        """Append the round's history line (its commit), log its table, redraw the views."""
        self.folder.append_history(line)
        self.lines.append(line)
        log.info("round %d\n%s", line.round, format_round_table(line))
        write_round_views(self.folder.path, self.lines)

    def finish(self, *, status: str, message: str) -> Summary:
        """Write summary.json: how the run ended and each site's privacy spend."""
        summary = Summary.of_history(self.lines, status=status, message=message)
        self.folder.write_summary(summary)
        return summary
