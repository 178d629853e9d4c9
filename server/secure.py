"""The coordinator's secure-aggregation round: four exchanges, then one DP-SGD step on the sum.

With `secure-aggregation = true` each round is SecAgg+ (`common.secagg`) over Flower messages of
type `train.secagg_*` (`common.protocol`): 1 the round's parameters out, each site's signed
public keys and the noise multiplier its budget needs back; 2 the key directory and the round's
noise multiplier z (the largest any site needs) out, sealed shares back; 3 the global parameters
and each site's shares out, its masked, noisy, clipped gradient sum back (the site is charged
before it replies); 4 who survived out, the shares that unmask the sum back. The coordinator
learns only the sum over the survivors (and their count and total expected batch), takes one
SGD step with it (the run's learning-rate and momentum, post-processing of the noisy sum), and
the round goes on as any other (checkpoint, evaluation, history line).

The round's parameters: threshold t, the least that keeps `secagg-colluders` colluders from
unmasking one site (t > (n + c) / 2); the noise is split into d = t - c shares, so that any t
survivors hold d honest shares; integer scale so that rounding adds at most 1% to the
sensitivity; a ring large enough for every site's largest honest value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from common import protocol as R
from common.errors import ConfigurationError, FedFusionError
from common.privacy.accounting import MAX_NOISE_MULTIPLIER
from common.privacy.distributed import (
    DistributedNoise,
    choose_scale,
    ring_bits,
)
from common.secagg import wire
from common.secagg.coordinator import CoordinatorSession
from common.secagg.messages import MaskedVector
from common.secagg.params import Layout, RoundKey, RoundParams, min_safe_threshold
from common.secagg.vector import UpdateSum
from server.recorder import RoundRecord
from server.replies import MalformedReply, Replies, read_stage
from server.sites import SiteNames

log = logging.getLogger(__name__)

Exchange = Callable[[list[list[Message]]], list[list[Message]]]

MAX_WEIGHT = 2**17  # the largest expected batch a site may weigh in with (max batch-size 100,000)


@dataclass(frozen=True, kw_only=True)
class SecurePlan:
    """What every secure round of the run uses (run config)."""

    colluders: int  # secagg-colluders: what the threshold is chosen for
    max_grad_norm: float  # C: the clipping norm the sum's sensitivity is computed from
    learning_rate: float
    momentum: float


@dataclass
class ServerStep:
    """SGD with momentum on the unmasked noisy gradient sum: theta -= lr * v, v = mu v + g."""

    learning_rate: float
    momentum: float
    velocity: dict[str, np.ndarray] = field(default_factory=dict)

    def apply(self, arrays: ArrayRecord, total: UpdateSum) -> ArrayRecord:
        """The global arrays after one step with the mean gradient sum / total expected batch."""
        if total.weight < 1:
            raise ValueError("the secure sum carries no expected batch: nothing to average")
        updated = {}
        for name, array in arrays.items():
            theta = array.numpy()
            grad = total.sums[name] / total.weight
            v = self.momentum * self.velocity.get(name, np.zeros_like(grad)) + grad
            self.velocity[name] = v
            updated[name] = Array(np.asarray(theta - self.learning_rate * v, dtype=theta.dtype))
        return ArrayRecord(updated)


def round_params(
    *, round_key: RoundKey, cohort: list[int], arrays: ArrayRecord, plan: SecurePlan
) -> tuple[RoundParams, int]:
    """The round's public parameters and d, the honest noise shares any t survivors hold."""
    n = len(cohort)
    t = max(2, min_safe_threshold(cohort_size=n, colluders=plan.colluders))
    if t > n:
        raise ValueError(
            f"{n} sites cannot hide an update from a coordinator with {plan.colluders} "
            f"colluders (threshold {t} > {n}); sample more sites or lower secagg-colluders"
        )
    layout = Layout(shapes=tuple((name, tuple(a.shape)) for name, a in arrays.items()))
    clip = plan.max_grad_norm
    scale = choose_scale(max_grad_norm=clip, coordinates=layout.coordinates)
    try:
        # the ring holds the largest noise share any site could add (z at its bound, d = 1)
        widest = DistributedNoise(
            noise_multiplier=MAX_NOISE_MULTIPLIER,
            shares=1,
            max_grad_norm=clip,
            scale=scale,
            coordinates=layout.coordinates,
        )
        bits = ring_bits(
            sites=n,
            max_batch=MAX_WEIGHT,
            max_grad_norm=clip,
            scale=scale,
            noise_bound=widest.noise_bound,
            max_weight=MAX_WEIGHT,
        )
    except ConfigurationError as err:
        raise ValueError(err.detail) from err
    params = RoundParams(
        round=round_key,
        cohort=tuple(sorted(cohort)),
        threshold=t,
        bits=bits,
        clip=MAX_WEIGHT * clip,  # a coordinate of a sum of clipped gradients
        scale=scale,
        noise_bound=widest.noise_bound,
        max_weight=MAX_WEIGHT,
        layout=layout,
    )
    return params, t - plan.colluders


def _message(node: int, action: str, config: ConfigRecord, fields: wire.Fields) -> Message:
    content = RecordDict({R.CONFIG: config, R.SECAGG: ConfigRecord(fields)})
    return Message(content=content, message_type=f"train.{action}", dst_node_id=node)


@dataclass(frozen=True)
class SecureOutcome:
    """A secure round at the coordinator: the evaluation replies pushed with it, the sum."""

    evaluated: list[Message]
    update: UpdateSum | None  # None: no sum this round
    why: str = ""  # why there is none
    sites: int = 0  # the survivors whose vectors the sum holds


@dataclass(frozen=True)
class _Masked:
    round: RoundKey
    vector: np.ndarray


def _masked(content: RecordDict) -> _Masked:
    if R.MASKED not in content.array_records or R.SECAGG not in content.config_records:
        raise MalformedReply(f"no '{R.MASKED}' record")
    arrays = content.array_records[R.MASKED]
    if list(arrays) != [R.MASKED_VECTOR]:
        raise MalformedReply(f"the '{R.MASKED}' record holds exactly '{R.MASKED_VECTOR}'")
    vector = arrays[R.MASKED_VECTOR].numpy()
    if vector.dtype != np.uint64 or vector.ndim != 1:
        raise MalformedReply("the masked vector is not a flat array of uint64")
    return _Masked(round=wire.round_key_from_fields(dict(content[R.SECAGG])), vector=vector)


def _sender(parsed: object) -> int | None:
    """The node a protocol message says it is from (its stage's sender field)."""
    for name in ("node", "sender"):
        if isinstance(value := getattr(parsed, name, None), int):
            return value
    return None


def secure_round(
    exchange: Exchange,
    *,
    cohort: list[int],
    arrays: ArrayRecord,
    config: ConfigRecord,
    round_key: RoundKey,
    plan: SecurePlan,
    names: SiteNames,
    record: RoundRecord,
    evaluate: list[Message],
) -> SecureOutcome:
    """One secure round; the previous round's evaluate messages go out with stage 1."""
    try:
        params, d = round_params(round_key=round_key, cohort=cohort, arrays=arrays, plan=plan)
    except ValueError as err:
        evaluated, _ = exchange([evaluate, []])
        return SecureOutcome(evaluated, None, str(err))
    coordinator = CoordinatorSession(params)
    stage1 = {
        **wire.params_fields(params),
        R.SECAGG_MAX_GRAD_NORM: float(plan.max_grad_norm),
        R.SECAGG_NOISE_SHARES: d,
    }
    evaluated, replies = exchange(
        [evaluate, [_message(n, R.SECAGG_KEYS, config, stage1) for n in params.cohort]]
    )
    z = 0.0
    try:
        offers, offered = _stage(
            record,
            names,
            replies,
            lambda c: wire.public_keys_from_fields(dict(c[R.SECAGG])),
            metrics=(R.NOISE_MULTIPLIER, R.SAMPLE_RATE),
        )
        # the sum carries the noise the most demanding site needs (each site checks it)
        z = max(
            (float(r.metrics[R.NOISE_MULTIPLIER]) for r in offered.ok if r.node_id in offers),
            default=0.0,
        )
        directory = coordinator.collect_keys(offers.values())
        stage2 = {**wire.directory_fields(directory), R.SECAGG_NOISE_MULTIPLIER: z}
        (replies,) = exchange(
            [[_message(k.node, R.SECAGG_SHARES, config, stage2) for k in directory.keys]]
        )
        sealed, _ = _stage(
            record, names, replies, lambda c: wire.sealed_from_fields(dict(c[R.SECAGG]))
        )
        deliveries = coordinator.collect_shares(sealed.values())
        messages = []
        for node, delivery in deliveries.items():
            message = _message(node, R.SECAGG_MASK, config, wire.delivery_fields(delivery))
            message.content[R.ARRAYS] = arrays
            messages.append(message)
        (replies,) = exchange([messages])
        masked, trained = _stage(record, names, replies, _masked, metrics=R.TRAIN_METRICS)
        record.add(trained, train=True)
        request = coordinator.collect_masked(
            MaskedVector(round=m.round, node=n, vector=m.vector) for n, m in masked.items()
        )
        stage4 = wire.unmask_fields(request)
        (replies,) = exchange(
            [[_message(n, R.SECAGG_REVEAL, config, stage4) for n in request.survivors]]
        )
        reveals, _ = _stage(
            record, names, replies, lambda c: wire.reveal_from_fields(dict(c[R.SECAGG]))
        )
        total = coordinator.collect_reveals(reveals.values())
    except FedFusionError as err:
        return SecureOutcome(evaluated, None, err.detail)
    log.info(
        "round %d: the secure sum of %d sites (%d dropped after sharing), noise multiplier "
        "%.3f split into %d shares",
        round_key.round,
        len(total.survivors),
        len(total.dropped),
        z,
        d,
    )
    return SecureOutcome(evaluated, total.update, sites=len(total.survivors))


T = TypeVar("T")


def _stage(
    record: RoundRecord,
    names: SiteNames,
    replies: list[Message],
    parse: Callable[[RecordDict], T],
    *,
    metrics: tuple[str, ...] = (),
) -> tuple[dict[int, T], Replies]:
    """A stage's usable replies by authenticated node; a reply naming another sender is
    malformed (a site cannot answer for another's slot); the rest go on the round's record."""
    parsed, replies_read = read_stage(replies, names=names, parse=parse, metrics=metrics)
    for node in list(parsed):
        claimed = _sender(parsed[node])
        if claimed is not None and claimed != node:
            del parsed[node]
            replies_read.ok = [r for r in replies_read.ok if r.node_id != node]
            replies_read.malformed[names.name(node, None)] = (
                f"malformed reply: it speaks for node {claimed}, but came from node {node}"
            )
    record.add_problems(replies_read)
    return parsed, replies_read
