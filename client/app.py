"""The hospital's Flower ClientApp: unpack the message, run the site's round, pack the reply.

Only the trainable parameters and the fixed scalar metrics of `common.protocol` leave the site,
plus its name. A problem the site can explain (`common.errors.FedFusionError`: a refusal, bad
data, a configuration error, a failure) becomes an error reply with its kind's code and a reason
of a fixed vocabulary (never a row, a label, a count or a path: those stay in the site's log);
any other exception is a defect in FedFusion and is reported as such (kind `bug`), with the
traceback in the site's log.

The run settings come from the run config (`context.run_config`), the site's own facts from the
node config (`client.site_config`); the round message carries the global parameters and the
per-round facts only (`RoundRequest`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import replace

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.evaluation import SiteEvaluation, evaluate_round
from client.rounds import RoundRequest, TrainOutcome, train_round
from client.secure import SecureTerms, mask_update, offer_keys, reveal_shares, share_secrets
from client.site_config import SiteConfig
from client.state import SiteState, SiteStates
from common import protocol as R
from common.config import RunConfig, parse_run_config
from common.errors import ConfigurationError, FedFusionError, Kind, Refusal, public_text
from common.secagg import wire
from common.secagg.params import MAX_COHORT
from common.secagg.wire import Fields

log = logging.getLogger(__name__)

app = ClientApp()
SITES = SiteStates()  # this process' warm site states (a simulation worker serves several)
SESSION = "fedfusion-secagg"  # Context.state: the site's open secure session (never sent)


def site_state(context: Context) -> tuple[RunConfig, SiteState]:
    """The run's settings as this site runs them (`SiteConfig.localize`) and its warm state."""
    run = parse_run_config(context.run_config)
    site = SiteConfig.from_node_config(context.node_config, run)
    return site.localize(run), SITES.get(site)


RUN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")
FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def round_request(msg: Message, context: Context) -> RoundRequest:
    """Unpack and check the round message: the global parameters and the per-round facts."""
    content = msg.content
    if (
        len(content.array_records) != 1
        or R.ARRAYS not in content.array_records
        or R.CONFIG not in content.config_records
    ):
        raise _malformed(
            f"the round message needs exactly its '{R.ARRAYS}' and '{R.CONFIG}' records."
        )
    facts = round_facts(content.config_records[R.CONFIG], context)
    parameters = content.array_records[R.ARRAYS].to_torch_state_dict()
    bad = [
        n for n, t in parameters.items() if t.dtype != torch.float32 or not torch.isfinite(t).all()
    ]
    if bad:
        raise _malformed(f"parameter(s) {bad[:3]} are not finite float32 values.")
    # a model crafted to overflow on one record would make that record's presence visible
    huge = [
        n for n, t in parameters.items() if t.numel() and float(t.abs().max()) > R.MAX_PARAMETER_ABS
    ]
    if huge:
        raise _malformed(
            f"parameter(s) {huge[:3]} exceed {R.MAX_PARAMETER_ABS:g} in magnitude, "
            "beyond any model trained honestly."
        )
    return replace(facts, parameters=parameters)


def round_facts(config: ConfigRecord, context: Context) -> RoundRequest:
    """The per-round facts of a message's config record (no parameters)."""
    server_round, run_key = config.get(R.SERVER_ROUND), config.get(R.RUN_KEY)
    fingerprint = config.get(R.FROZEN_FINGERPRINT)
    if not isinstance(server_round, int) or isinstance(server_round, bool) or server_round < 1:
        raise _malformed(f"its {R.SERVER_ROUND} is not a round number.")
    if not isinstance(run_key, str) or not RUN_KEY.fullmatch(run_key):
        raise _malformed(f"its {R.RUN_KEY} is not 1 to 128 letters, digits, '.', '_' or '-'.")
    if not isinstance(fingerprint, str) or not FINGERPRINT.fullmatch(fingerprint):
        raise _malformed(f"its {R.FROZEN_FINGERPRINT} is not a SHA-256 (64 hex digits).")
    return RoundRequest(
        server_round=server_round,
        run_key=run_key,
        frozen_fingerprint=fingerprint,
        parameters={},
        flower_run_id=int(context.run_id),
    )


def _malformed(why: str) -> ConfigurationError:
    return ConfigurationError(f"the round message is malformed: {why}", reason="message")


def _site_name(context: Context) -> str:
    """The site's name for an error reply, even when its configuration cannot be read."""
    return str(
        context.node_config.get("site-name")
        or (
            f"hospital-{context.node_config['partition-id']}"
            if "partition-id" in context.node_config
            else f"node-{context.node_id}"
        )
    )


def _simulated(context: Context) -> bool:
    """A simulated hospital: the researcher plays every party, so a reply may carry details."""
    return "partition-id" in context.node_config and "manifest" not in context.node_config


def error_reply(msg: Message, site: str, err: Exception, *, detailed: bool = False) -> Message:
    """The error reply for `err`: its kind's code, and a reason of the fixed vocabulary.

    The detail (which may name files, rows, labels or counts) goes to the site's own log; only
    a simulated site (`detailed`), where the researcher plays every party, adds it to the reply.
    """
    if isinstance(err, FedFusionError):
        kind, text, detail = err.kind, err.public, err.detail
        role = err.reason == "evaluate-only"  # the site's role, not a problem: train is declined
        log.log(
            logging.INFO if role else logging.ERROR,
            "site %s: %s (%s): %s",
            site,
            kind,
            err.reason,
            detail,
        )
    else:
        kind, text = Kind.BUG, public_text(Kind.BUG, "internal-error")
        detail = f"{type(err).__name__}: {err}"
        log.exception("site %s: internal error (a defect in FedFusion): %s", site, detail)
    reason = R.error_reason(site, f"{text} ({detail})" if detailed else text)
    return Message(Error(code=R.ERROR_CODES[kind], reason=reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global trainable parameters on this site's data."""
    site = _site_name(context)
    try:
        run, state = site_state(context)
        site = state.site.site_name
        outcome = train_round(state, run, round_request(msg, context))
    except Exception as err:  # every failure becomes a reply, none a crash
        return error_reply(msg, site, err, detailed=_simulated(context))
    return Message(train_content(outcome, site), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global parameters on this site's validation split."""
    site = _site_name(context)
    try:
        run, state = site_state(context)
        site = state.site.site_name
        evaluation = evaluate_round(state, run, round_request(msg, context))
    except Exception as err:
        return error_reply(msg, site, err, detailed=_simulated(context))
    return Message(evaluate_content(evaluation, site), reply_to=msg)


def train_content(outcome: TrainOutcome, site: str) -> RecordDict:
    """The train reply: the parameters trained (R.ARRAYS), those not trained (R.UPDATE), metrics."""
    account = outcome.account
    return RecordDict(
        {
            R.ARRAYS: ArrayRecord(outcome.state),  # only the parameters trained this round
            R.UPDATE: ConfigRecord({R.UNTRAINED: list(outcome.untrained)}),
            R.METRICS: MetricRecord(
                {
                    R.NUM_EXAMPLES: outcome.num_examples,
                    R.TRAIN_LOSS: _rounded(outcome.train_loss, outcome.policy.metric_decimals),
                    R.EPSILON: _spent(outcome.receipt.epsilon) if account else math.inf,
                    R.DELTA: float(account.delta) if account else 0.0,
                    R.NOISE_MULTIPLIER: float(account.noise_multiplier) if account else 0.0,
                    R.SAMPLE_RATE: float(account.sample_rate) if account else 0.0,
                    R.STEPS: int(account.steps) if account else int(outcome.result.steps),
                    R.TRAIN_SECONDS: float(outcome.result.seconds),
                    R.EPSILON_CAP: float(outcome.terms.epsilon_cap) if account else math.inf,
                    R.MAX_GRAD_NORM: float(outcome.terms.max_grad_norm),
                }
            ),
            R.SITE: ConfigRecord({R.SITE_NAME: site}),
        }
    )


def _spent(epsilon: float | None) -> float:
    """A DP round's cumulative epsilon (its receipt always has one; None raises, as before)."""
    if epsilon is None:
        raise TypeError("the receipt of a round trained with DP has no epsilon.")
    return float(epsilon)


def _rounded(value: float, decimals: int) -> float:
    return round(float(value), decimals) if math.isfinite(value) else math.nan


def evaluate_content(evaluation: SiteEvaluation, site: str) -> RecordDict:
    """The evaluate reply: EVAL_METRICS (the ablation's are nan when the site withholds them)
    and the released score counts they were computed from (R.COUNTS)."""
    m, a = evaluation.metrics, evaluation.ablation
    ablation: dict[str, float] = {}
    for keep, (accuracy, auroc) in R.ABLATION_KEYS.items():
        scored = getattr(a, keep.replace("-", "_")) if a else None
        ablation[accuracy] = float(scored.accuracy) if scored is not None else math.nan
        ablation[auroc] = float(scored.auroc) if scored is not None else math.nan
    counts = {
        f"{view}/{name}": Array(array)
        for view, c in evaluation.counts.views.items()
        for name, array in c.arrays().items()
    }
    return RecordDict(
        {
            R.METRICS: MetricRecord(
                {
                    R.NUM_EXAMPLES: m.num_examples,
                    R.LOSS: float(m.loss),
                    R.ACCURACY: float(m.accuracy),
                    R.AUROC: float(m.auroc),
                    R.F1: float(m.f1),
                    **ablation,
                    R.COUNT_NOISE: float(evaluation.counts.noise_std),
                    R.EXTERNAL: 1.0 if evaluation.external else 0.0,
                }
            ),
            R.COUNTS: ArrayRecord(counts),
            R.SITE: ConfigRecord({R.SITE_NAME: site}),
        }
    )


# --- secure aggregation: four stages, the site's session kept in its own Context.state --------


def _stage(msg: Message, context: Context, *, arrays: bool) -> tuple[RoundRequest, Fields]:
    """A stage message's round facts (and parameters at stage 3) and its protocol fields."""
    content = msg.content
    expected = {R.CONFIG, R.SECAGG}
    if set(content.config_records) != expected or len(content.metric_records):
        raise _malformed(f"a secure-aggregation stage carries exactly the records {expected}.")
    if arrays:
        request = round_request(
            Message(
                RecordDict({R.ARRAYS: content[R.ARRAYS], R.CONFIG: content[R.CONFIG]}),
                reply_to=msg,
            ),
            context,
        )
    elif content.array_records:
        raise _malformed("only stage 3 of secure aggregation carries arrays.")
    else:
        request = round_facts(content.config_records[R.CONFIG], context)
    return request, dict(content[R.SECAGG])


def _kept(context: Context) -> ConfigRecord:
    """The site's secure session, as an earlier stage of this round left it."""
    if SESSION not in context.state.config_records:
        raise Refusal(
            "the site has no open secure session: a secure round runs its four stages in order",
            reason="secagg-unsafe",
        )
    return context.state.config_records[SESSION]


def _keep(context: Context, **fields: bytes | float | int) -> None:
    record = context.state.config_records.get(SESSION, ConfigRecord())
    for key, value in fields.items():
        record[key] = value
    context.state.config_records[SESSION] = record


def _forget(context: Context) -> None:
    """A stage failed: the session's secrets are dropped (nothing more is answered)."""
    context.state.config_records.pop(SESSION, None)


def _secure_terms(fields: Fields) -> SecureTerms:
    clip, shares = fields.get(R.SECAGG_MAX_GRAD_NORM), fields.get(R.SECAGG_NOISE_SHARES)
    if not isinstance(clip, float) or not (math.isfinite(clip) and clip > 0):
        raise _malformed(f"its {R.SECAGG_MAX_GRAD_NORM} is not a positive number.")
    if isinstance(shares, bool) or not isinstance(shares, int) or not 1 <= shares <= MAX_COHORT:
        raise _malformed(f"its {R.SECAGG_NOISE_SHARES} is not a whole number from 1 to 64.")
    return SecureTerms(max_grad_norm=clip, noise_shares=shares)


def _secure_reply(
    msg: Message, site: str, records: dict[str, ConfigRecord | MetricRecord | ArrayRecord]
) -> Message:
    content = RecordDict({**records, R.SITE: ConfigRecord({R.SITE_NAME: site})})
    return Message(content, reply_to=msg)


@app.train(R.SECAGG_KEYS)
def secagg_keys(msg: Message, context: Context) -> Message:
    """Stage 1: the round's parameters in, the site's signed public keys out."""
    site = _site_name(context)
    _forget(context)  # a new round: whatever an unfinished one left is dropped
    try:
        run, state = site_state(context)
        site = state.site.site_name
        request, fields = _stage(msg, context, arrays=False)
        secure = _secure_terms(fields)
        offer = offer_keys(
            state, run, request, wire.params_from_fields(fields), secure, node=context.node_id
        )
    except Exception as err:
        return error_reply(msg, site, err, detailed=_simulated(context))
    _keep(
        context,
        session=offer.session,
        **{
            R.SECAGG_MAX_GRAD_NORM: secure.max_grad_norm,
            R.SECAGG_NOISE_SHARES: secure.noise_shares,
        },
    )
    return _secure_reply(
        msg,
        site,
        {
            R.SECAGG: ConfigRecord(wire.public_keys_fields(offer.keys)),
            R.METRICS: MetricRecord(
                {R.NOISE_MULTIPLIER: offer.noise_multiplier, R.SAMPLE_RATE: offer.sample_rate}
            ),
        },
    )


@app.train(R.SECAGG_SHARES)
def secagg_shares(msg: Message, context: Context) -> Message:
    """Stage 2: the key directory and the round's noise multiplier in, sealed shares out."""
    site = _site_name(context)
    try:
        _run, state = site_state(context)
        site = state.site.site_name
        request, fields = _stage(msg, context, arrays=False)
        z = fields.get(R.SECAGG_NOISE_MULTIPLIER)
        if not isinstance(z, float):
            raise _malformed(f"its {R.SECAGG_NOISE_MULTIPLIER} is not a number.")
        sealed, session = share_secrets(
            state,
            request,
            wire.directory_from_fields(fields),
            noise_multiplier=z,
            session=_session_bytes(_kept(context)),
        )
    except Exception as err:
        _forget(context)
        return error_reply(msg, site, err, detailed=_simulated(context))
    _keep(context, session=session, **{R.SECAGG_NOISE_MULTIPLIER: z})
    return _secure_reply(msg, site, {R.SECAGG: ConfigRecord(wire.sealed_fields(sealed))})


@app.train(R.SECAGG_MASK)
def secagg_mask(msg: Message, context: Context) -> Message:
    """Stage 3: the global parameters and this site's shares in; one noisy step, masked, out."""
    site = _site_name(context)
    try:
        run, state = site_state(context)
        site = state.site.site_name
        request, fields = _stage(msg, context, arrays=True)
        kept = _kept(context)
        secure = _secure_terms(dict(kept))  # as accepted at stage 1
        outcome = mask_update(
            state,
            run,
            request,
            wire.delivery_from_fields(fields),
            secure,
            noise_multiplier=_kept_number(kept, R.SECAGG_NOISE_MULTIPLIER),  # as at stage 2
            session=_session_bytes(kept),
        )
    except Exception as err:
        _forget(context)
        return error_reply(msg, site, err, detailed=_simulated(context))
    _keep(context, session=outcome.session)
    account = outcome.account
    return _secure_reply(
        msg,
        site,
        {
            R.MASKED: ArrayRecord({R.MASKED_VECTOR: Array(outcome.masked.vector)}),
            R.SECAGG: ConfigRecord(wire.round_key_fields(outcome.masked.round)),
            R.METRICS: MetricRecord(
                {
                    R.NUM_EXAMPLES: outcome.num_examples,
                    R.TRAIN_LOSS: math.nan,  # one step's loss would be one more release
                    R.EPSILON: _spent(outcome.receipt.epsilon) if account else math.inf,
                    R.DELTA: float(account.delta) if account else 0.0,
                    R.NOISE_MULTIPLIER: float(account.noise_multiplier) if account else 0.0,
                    R.SAMPLE_RATE: float(account.sample_rate) if account else 0.0,
                    R.STEPS: 1,
                    R.TRAIN_SECONDS: float(outcome.seconds),
                    R.EPSILON_CAP: float(outcome.terms.epsilon_cap) if account else math.inf,
                    R.MAX_GRAD_NORM: float(secure.max_grad_norm),  # the round's clip
                }
            ),
        },
    )


@app.train(R.SECAGG_REVEAL)
def secagg_reveal(msg: Message, context: Context) -> Message:
    """Stage 4: who survived and who dropped in; the shares that unmask the sum out."""
    site = _site_name(context)
    try:
        _run, state = site_state(context)
        site = state.site.site_name
        request, fields = _stage(msg, context, arrays=False)
        reveal = reveal_shares(
            state,
            request,
            wire.unmask_from_fields(fields),
            session=_session_bytes(_kept(context)),
        )
    except Exception as err:
        return error_reply(msg, site, err, detailed=_simulated(context))
    finally:
        _forget(context)  # the round is over at the site whatever happened
    return _secure_reply(msg, site, {R.SECAGG: ConfigRecord(wire.reveal_fields(reveal))})


def _kept_number(kept: ConfigRecord, key: str) -> float:
    value = kept.get(key)
    if not isinstance(value, float):
        raise Refusal(
            f"the site's secure session has no {key}: stages run in order", reason="secagg-unsafe"
        )
    return value


def _session_bytes(kept: ConfigRecord) -> bytes:
    blob = kept.get("session")
    if not isinstance(blob, bytes):
        raise Refusal("the site's secure session is missing its state", reason="secagg-unsafe")
    return blob
