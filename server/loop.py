"""The coordinator's round loop: Flower's strategy in the middle, screening and recording around it.

Each round, in order: Flower's strategy samples the sites and builds the train messages; the
replies are read and checked (`server.replies`), updates screened (`server.screening`) and
partial updates completed; too few usable updates stop the run there; Flower's strategy
aggregates; the global state is checkpointed. The sites evaluate that aggregate in the next
round's exchange: its evaluate messages are pushed just before the next round's train messages,
so a deployed SuperNode finds the second queued when it has answered the first (Flower 1.42's
SuperNode sleeps 3 s whenever it asks for a message and finds none, once per exchange). When the
evaluation is in, the round's history line commits the round (`server.recorder`); the last
round's evaluation has an exchange of its own. A resumed run starts the loop after its last
finished round: a round whose line was not written is run again, and its sites re-send the
update they were charged for and refuse to release a second evaluation of it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, MetricRecordValues
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import protocol as R
from common.model.contributions import modality_weights
from common.secagg.params import RoundKey as SecureRoundKey
from server.evaluation import SiteCounts, pooled_metrics
from server.recorder import Recorder, RoundRecord, aggregate_line
from server.replies import Replies, read_replies
from server.screening import (
    UpdateBounds,
    cap_weights,
    complete_partial_updates,
    screen_updates,
)
from server.secure import SecureOutcome, SecurePlan, ServerStep, secure_round
from server.sites import SiteGrid
from server.strategy import optimizer_state

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # between pulls of the round's replies
EXTERNAL_METRICS = (R.LOSS, R.ACCURACY, R.AUROC, R.F1)  # pooled apart for evaluation-only sites


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """What every round of this run does, whatever its number."""

    last_round: int
    timeout: float  # seconds for each phase's replies
    min_nodes: int  # fewer usable updates than this stop the run
    bounds: UpdateBounds
    weight_factor: float  # a site's weight: at most this x the round's median (0 = no cap)
    run_key: str
    fingerprint: str
    num_classes: int = 2  # fixes the shapes of the sites' released score counts
    fields: bool = False  # the run declares structured fields (their ablation views are allowed)
    secure: SecurePlan | None = None  # each round inside secure aggregation (server.secure)

    def config(self) -> ConfigRecord:
        """The per-round facts every site is told (Flower's strategy adds the round number)."""
        return ConfigRecord({R.RUN_KEY: self.run_key, R.FROZEN_FINGERPRINT: self.fingerprint})


@dataclass(frozen=True)
class LoopEnd:
    """How the loop ended: the global state after the last finished round, and why it stopped."""

    arrays: ArrayRecord
    stopped: str | None = None  # None: every planned round finished


@dataclass(frozen=True)
class Aggregated:
    """A round aggregated and checkpointed, whose history line waits for its evaluation."""

    record: RoundRecord
    arrays: ArrayRecord  # the round's aggregate: what the sites evaluate
    train_metrics: MetricRecord | None
    evaluate: list[Message]  # Flower's strategy's evaluate messages for it


def run_rounds(
    grid: SiteGrid,
    strategy: FedAvg,
    recorder: Recorder,
    plan: RoundPlan,
    *,
    first_round: int,
    arrays: ArrayRecord,
) -> LoopEnd:
    """Rounds `first_round`..`plan.last_round`; a round with too few usable updates ends the run.

    Round r's history line is committed when the sites' evaluation of its aggregate is in: with
    round r + 1's train replies (one exchange), or alone after the last round; at once when no
    site is asked to evaluate (`fraction-evaluate` 0).
    """
    names = grid.names
    waiting: Aggregated | None = None  # the previous round, until its evaluation is in
    step = ServerStep(plan.secure.learning_rate, plan.secure.momentum) if plan.secure else None
    for server_round in range(first_round, plan.last_round + 1):
        evaluate = waiting.evaluate if waiting else []
        record = RoundRecord(server_round, names)
        messages = strategy.configure_train(server_round, arrays, plan.config(), grid)
        for node in grid.take_outsiders():  # online, but not one of the run's site-nodes
            record.reject(
                f"node {node}", "not among the run's site-nodes: sent nothing, nothing aggregated."
            )
        train_metrics: MetricRecord | None = None
        if plan.secure is not None and step is not None:
            outcome = secure_round(
                lambda groups: exchange_in_turn(grid, groups, plan.timeout),
                cohort=[m.metadata.dst_node_id for m in messages],
                arrays=arrays,
                config=ConfigRecord({**dict(plan.config()), R.SERVER_ROUND: server_round}),
                round_key=SecureRoundKey(run=plan.run_key, round=server_round),
                plan=plan.secure,
                names=names,
                record=record,
                evaluate=evaluate,
            )
            if waiting is not None:
                _commit_evaluated(recorder, waiting, outcome.evaluated, plan)
            if outcome.update is None or outcome.sites < plan.min_nodes:
                why = _no_secure_sum(server_round, outcome, plan.min_nodes, record)
                recorder.commit(record.line(stopped=why))
                return LoopEnd(arrays, stopped=why)
            arrays = step.apply(arrays, outcome.update)
        else:
            evaluated, trained = exchange_in_turn(grid, [evaluate, list(messages)], plan.timeout)
            if waiting is not None:
                _commit_evaluated(recorder, waiting, evaluated, plan)
            replies = read_replies(trained, train=True, names=names, num_classes=plan.num_classes)
            record.add(replies, train=True)
            usable = screened(replies, arrays, plan, record)
            if len(usable) < plan.min_nodes:
                why = _too_few(server_round, len(usable), plan.min_nodes, record)
                recorder.commit(record.line(stopped=why))
                return LoopEnd(arrays, stopped=why)
            aggregated, train_metrics = strategy.aggregate_train(server_round, usable)
            arrays = _like(aggregated, arrays)
        recorder.checkpoint(server_round, arrays, optimizer_state(strategy))
        evaluate = list(strategy.configure_evaluate(server_round, arrays, plan.config(), grid))
        waiting = Aggregated(record, arrays, train_metrics, evaluate)
        if not evaluate:  # nothing to wait for
            _commit_evaluated(recorder, waiting, [], plan)
            waiting = None
    if waiting is not None:  # the last round's evaluation: nothing to train with it
        evaluated, _ = exchange_in_turn(grid, [waiting.evaluate, []], plan.timeout)
        _commit_evaluated(recorder, waiting, evaluated, plan)
    return LoopEnd(arrays)


def _commit_evaluated(
    recorder: Recorder, waiting: Aggregated, evaluated: list[Message], plan: RoundPlan
) -> None:
    """Record the sites' evaluation of a round's aggregate, then commit the round's line."""
    replies = read_replies(
        evaluated,
        train=False,
        names=waiting.record.names,
        num_classes=plan.num_classes,
        fields=plan.fields,
    )
    waiting.record.add(replies, train=False)
    pooled: dict[str, MetricRecordValues] = dict(  # a copy: `dict` is invariant
        validation_metrics(replies)
    )
    recorder.commit(
        waiting.record.line(
            aggregate=aggregate_line(waiting.train_metrics, MetricRecord(pooled)),
            modality_weights=modality_weights(waiting.arrays),
        )
    )


def validation_metrics(evaluated: Replies) -> dict[str, float]:
    """The round's pooled validation metrics over the training sites' validation rows, and
    apart (`external-*`) over the evaluation-only sites' records: an external validation."""
    sites = [
        SiteCounts(records=int(r.metrics[R.NUM_EXAMPLES]), metrics=r.metrics, counts=r.counts)
        for r in evaluated.ok
        if r.counts is not None
    ]
    external = [s for s in sites if s.metrics[R.EXTERNAL] == 1.0]
    pooled = pooled_metrics(s for s in sites if s.metrics[R.EXTERNAL] != 1.0)
    if external:
        outside = pooled_metrics(external)
        pooled.update({f"{R.EXTERNAL}-{key}": outside[key] for key in EXTERNAL_METRICS})
        pooled[f"{R.EXTERNAL}-{R.NUM_EXAMPLES}"] = float(sum(s.records for s in external))
    return pooled


def exchange_in_turn(
    grid: Grid, groups: list[list[Message]], timeout: float
) -> list[list[Message]]:
    """Push each group of messages in turn, then collect the replies in within `timeout` s.

    A node given messages of several groups finds them queued in that order. Flower's
    `send_and_receive`, but polling for replies every `POLL_SECONDS`: Flower's deployment grid
    waits 3 s between pulls, which would add seconds to every round. Returns each group's
    replies.
    """
    sent = [list(grid.push_messages(group)) if group else [] for group in groups]
    pending = dict.fromkeys(i for ids in sent for i in ids)  # ordered: reproducible runs
    deadline = time.monotonic() + timeout
    replies: dict[str, Message] = {}
    while pending:
        for reply in grid.pull_messages(list(pending)):
            asked = reply.metadata.reply_to_message_id
            if asked in pending:
                replies[asked] = reply
                del pending[asked]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    return [[replies[i] for i in ids if i in replies] for ids in sent]


def screened(
    replies: Replies, arrays: ArrayRecord, plan: RoundPlan, record: RoundRecord
) -> list[Message]:
    """The train replies fit to aggregate: screened, weights capped, partial updates completed."""
    global_arrays = {k: v.numpy() for k, v in arrays.items()}
    trained = [(r, r.update) for r in replies.ok if r.update is not None]
    updates = {id(u): r for r, u in trained}
    screening = screen_updates([u for _, u in trained], global_arrays, plan.bounds)
    for site, reason in screening.rejected.items():
        record.reject(site, reason)
    accepted = [updates[id(u)] for u in screening.accepted]  # by identity: names may repeat
    weighted, capped = cap_weights(screening.accepted, plan.weight_factor)
    for site, change in capped.items():
        record.cap(site, change)
    full = complete_partial_updates(weighted, global_arrays)
    for reply, update, complete in zip(accepted, weighted, full, strict=True):
        if update.untrained:  # only a partial update needs repacking (saves a serialisation)
            reply.message.content[R.ARRAYS] = ArrayRecord(
                {k: Array(v) for k, v in complete.items()}
            )
        # as checked (`server.replies` passes on only a MetricRecord under `metrics`)
        reply.message.content.metric_records[R.METRICS][R.NUM_EXAMPLES] = update.num_examples
    return [r.message for r in accepted]


def _like(aggregated: ArrayRecord | None, arrays: ArrayRecord) -> ArrayRecord:
    """The aggregate in the global model's dtypes (FedAdam/FedYogi compute in float64)."""
    if aggregated is None:
        return arrays
    return ArrayRecord(
        {
            k: Array(np.asarray(v.numpy(), dtype=arrays[k].numpy().dtype))
            for k, v in aggregated.items()
        }
    )


def _no_secure_sum(
    server_round: int, outcome: SecureOutcome, min_nodes: int, record: RoundRecord
) -> str:
    """Why the run stops after a secure round without a usable sum."""
    if outcome.update is not None:
        return _too_few(server_round, outcome.sites, min_nodes, record)
    return (
        f"Round {server_round}: no secure sum: {outcome.why}. "
        f"{_problems(record) or 'No replies before the round timeout.'}"
    )


def _too_few(server_round: int, usable: int, min_nodes: int, record: RoundRecord) -> str:
    """Why the run stops: every refusal, failure and rejected update, each naming its site."""
    why = _problems(record) or "No replies before the round timeout."
    return (
        f"Round {server_round}: {usable} site(s) sent a usable update, fewer than "
        f"min-nodes={min_nodes}. {why}"
    )


def _problems(record: RoundRecord) -> str:
    """Every refusal, failure and rejected update of the round, each naming its site."""
    parts = [
        f"Refused: {'; '.join(f'{s}: {r}' for s, r in record.refusals.items())}"
        if record.refusals
        else "",
        f"Failed: {'; '.join(f'{s}: {r}' for s, r in record.failures.items())}"
        if record.failures
        else "",
        f"Rejected: {'; '.join(f'{s}: {r}' for s, r in record.rejected.items())}"
        if record.rejected
        else "",
    ]
    return " ".join(p for p in parts if p)
