"""The sites' replies, read and checked where they enter the coordinator, before any use.

A reply is untrusted input. An error reply becomes a refusal or a failure (by its kind's code,
`common.protocol.ERROR_CODES`); a reply is malformed, and is recorded as rejected rather than
used, when a record is missing or not of the protocol, a metric is missing, extra or not a
number, or `num-examples` is not a whole number from 1 to `MAX_EXAMPLES`. Nothing here raises
on a site's bad reply.

A site's name is what it says it is (a ConfigRecord, or the error reason); the node it came from
is what Flower authenticated, and `server.sites.SiteNames` decides the name it is recorded under
(the coordinator's `site-nodes`, else its registration, else its claim); a reply from a node
outside `site-nodes` is rejected, never used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from flwr.app import Message, RecordDict

from common import protocol as R
from common.errors import ConfigurationError, Kind
from common.training.score_counts import ScoreCounts
from server.evaluation import MalformedCounts, read_counts
from server.screening import Update
from server.sites import SiteNames

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_EXAMPLES = 10**8  # records at one site: a weight beyond this is not believed


@dataclass(frozen=True, kw_only=True)
class Reply:
    """One usable reply: who sent it and what it reported."""

    node_id: int
    site: str
    metrics: dict[str, float]  # exactly the reply kind's metrics, each a finite number or inf/nan
    update: Update | None  # train replies: the parameters sent and those declared untrained
    message: Message
    counts: dict[str, ScoreCounts] | None = None  # evaluate replies: the released score counts


@dataclass(frozen=True, kw_only=True)
class ErrorReply:
    """A site's error reply: its node, the name it gave (if any), the kind and the reason."""

    node_id: int
    claimed: str | None  # a crash Flower caught names no site
    kind: Kind
    text: str


@dataclass
class Replies:
    """A phase's replies, sorted into the usable ones and why the others are not."""

    ok: list[Reply] = field(default_factory=list)
    errors: list[ErrorReply] = field(default_factory=list)
    malformed: dict[str, str] = field(default_factory=dict)  # site: why its reply is unusable


def read_replies(
    messages: Iterable[Message],
    *,
    train: bool,
    names: SiteNames,
    num_classes: int = 2,
    fields: bool = False,
) -> Replies:
    """Sort a phase's replies (train or evaluate) into usable ones, refusals, failures, malformed.

    `num_classes`: the run's, which fixes the shapes of an evaluate reply's counts; `fields`:
    the run declares structured fields, which allows their ablation views.
    """
    out = Replies()
    for msg in messages:
        node = msg.metadata.src_node_id
        if msg.has_error():
            # Flower reads an empty reason off the wire as None
            error = R.read_error(msg.error.code, msg.error.reason or "")
            out.errors.append(
                ErrorReply(node_id=node, claimed=error.site, kind=error.kind, text=error.text)
            )
            log.log(
                logging.INFO if error.text.startswith("evaluate-only") else logging.WARNING,
                "node %d (%s) %s: %s",
                node,
                error.site or "no name given",
                "refused" if error.kind is Kind.REFUSAL else "failed",
                error.text,
            )
            continue
        site = _site(msg, names, out)
        if site is None:
            continue
        try:
            out.ok.append(_read(msg, node, site, train, num_classes, fields))
        except MalformedReply as err:
            out.malformed[site] = f"malformed reply: {err}"
            log.warning("site %s: malformed reply: %s", site, err)
    return out


class MalformedReply(Exception):
    """A reply that does not follow the protocol."""


def _site(msg: Message, names: SiteNames, out: Replies) -> str | None:
    """The replying node's site name; None (and the reply set aside as malformed) when the node
    is not among the run's site-nodes."""
    node = msg.metadata.src_node_id
    site = names.name(node, _claimed_name(msg))
    if names.known(node):
        return site
    out.malformed[site] = "the node is not among the run's site-nodes; its reply is not used."
    return None


def _claimed_name(msg: Message) -> str | None:
    if R.SITE in msg.content.config_records:
        value = msg.content[R.SITE].get(R.SITE_NAME)
        return value if isinstance(value, str) else None
    return None


# the records a reply may hold, by kind: anything else would reach Flower's aggregation (which
# raises on a second ArrayRecord, and cannot average a list-valued metric) or the run folder
TRAIN_RECORDS = {"array": {R.ARRAYS}, "metric": {R.METRICS}, "config": {R.UPDATE, R.SITE}}
EVAL_RECORDS = {"array": {R.COUNTS}, "metric": {R.METRICS}, "config": {R.SITE}}


def _read(msg: Message, node: int, site: str, train: bool, num_classes: int, fields: bool) -> Reply:
    content = msg.content
    _check_records(content, TRAIN_RECORDS if train else EVAL_RECORDS)
    metrics = _metrics(content, R.TRAIN_METRICS if train else R.EVAL_METRICS)
    _check_examples(metrics)
    n = metrics[R.NUM_EXAMPLES]
    if train:
        return Reply(
            node_id=node,
            site=site,
            metrics=metrics,
            message=msg,
            update=_update(content, site, int(n)),
        )
    if metrics[R.EXTERNAL] not in (0.0, 1.0):
        raise MalformedReply(f"{R.EXTERNAL} is {metrics[R.EXTERNAL]!r}, not 0 or 1.")
    if R.COUNTS not in content.array_records:
        raise MalformedReply(f"no '{R.COUNTS}' record.")
    try:
        arrays = content.array_records[R.COUNTS]
        counts = read_counts({k: v.numpy() for k, v in arrays.items()}, num_classes, fields=fields)
    except MalformedCounts as err:
        raise MalformedReply(f"'{R.COUNTS}': {err}") from err
    return Reply(node_id=node, site=site, metrics=metrics, update=None, message=msg, counts=counts)


def _metrics(content: RecordDict, keys: tuple[str, ...]) -> dict[str, float]:
    """Exactly the metrics `keys`, each a number."""
    if R.METRICS not in content.metric_records:
        raise MalformedReply(f"no '{R.METRICS}' record.")
    record = content[R.METRICS]
    missing = [k for k in keys if k not in record]
    if missing:
        raise MalformedReply(f"metric(s) {missing} missing.")
    extra = sorted(set(record) - set(keys))
    if extra:
        raise MalformedReply(f"metric(s) {extra[:5]} are not in the protocol's {len(keys)}.")
    metrics: dict[str, float] = {}
    for key in keys:
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedReply(f"metric {key} is not a number.")
        metrics[key] = value
    return metrics


# a secure-aggregation stage's reply: its protocol fields, stage 3's masked vector, the metrics
SECURE_RECORDS = {"array": {R.MASKED}, "metric": {R.METRICS}, "config": {R.SECAGG, R.SITE}}


def read_stage(
    messages: Iterable[Message],
    *,
    names: SiteNames,
    parse: Callable[[RecordDict], T],
    metrics: tuple[str, ...] = (),
) -> tuple[dict[int, T], Replies]:
    """A secure-aggregation stage's replies: each usable one parsed (by node), with its
    `metrics` checked as a train reply's are; refusals, failures and malformed replies apart.

    `parse` reads the protocol's fields; a ConfigurationError or MalformedReply from it makes
    the reply malformed (the coordinator's session then counts the site as dropped).
    """
    out, parsed = Replies(), {}
    for msg in messages:
        node = msg.metadata.src_node_id
        if msg.has_error():
            one = read_replies([msg], train=True, names=names)
            out.errors += one.errors
            continue
        site = _site(msg, names, out)
        if site is None:
            continue
        try:
            _check_records(msg.content, SECURE_RECORDS)
            values = _metrics(msg.content, metrics) if metrics else {}
            if R.NUM_EXAMPLES in values:
                _check_examples(values)
            parsed[node] = parse(msg.content)
        except (MalformedReply, ConfigurationError) as err:
            detail = err.detail if isinstance(err, ConfigurationError) else str(err)
            out.malformed[site] = f"malformed reply: {detail}"
            log.warning("site %s: malformed secure-aggregation reply: %s", site, detail)
            continue
        if metrics:
            out.ok.append(Reply(node_id=node, site=site, metrics=values, update=None, message=msg))
    return parsed, out


def _check_examples(metrics: dict[str, float]) -> None:
    n = metrics[R.NUM_EXAMPLES]
    if not (isinstance(n, int) or (math.isfinite(n) and float(n).is_integer())) or not (
        1 <= n <= MAX_EXAMPLES
    ):
        raise MalformedReply(
            f"{R.NUM_EXAMPLES} is {n!r}, not a whole number from 1 to {MAX_EXAMPLES}."
        )
    metrics[R.NUM_EXAMPLES] = int(n)


def _check_records(content: RecordDict, allowed: dict[str, set[str]]) -> None:
    """Only the protocol's records, each of its kind (names are the site's; at most 5 shown)."""
    held = {
        "array": set(content.array_records),
        "metric": set(content.metric_records),
        "config": set(content.config_records),
    }
    extra = sorted(
        f"{name} ({kind})" for kind, names in held.items() for name in names - allowed[kind]
    )
    if extra:
        raise MalformedReply(f"record(s) {extra[:5]} are not in the protocol.")


def _update(content: RecordDict, site: str, num_examples: int) -> Update:
    if R.ARRAYS not in content.array_records:
        raise MalformedReply(f"no '{R.ARRAYS}' record.")
    declared: object = []
    if R.UPDATE in content.config_records:
        declared = content.config_records[R.UPDATE].get(R.UNTRAINED, [])
    if not isinstance(declared, list) or not all(isinstance(x, str) for x in declared):
        raise MalformedReply(f"'{R.UNTRAINED}' is not a list of parameter names.")
    arrays = {k: v.numpy() for k, v in content.array_records[R.ARRAYS].items()}
    return Update(site=site, arrays=arrays, untrained=tuple(declared), num_examples=num_examples)
