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
from client.site_config import SiteConfig
from client.state import SiteState, SiteStates
from common import protocol as R
from common.config import RunConfig, parse_run_config
from common.errors import ConfigurationError, FedFusionError, Kind, public_text

log = logging.getLogger(__name__)

app = ClientApp()
SITES = SiteStates()  # this process' warm site states (a simulation worker serves several)


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
    config = content[R.CONFIG]
    server_round, run_key = config.get(R.SERVER_ROUND), config.get(R.RUN_KEY)
    fingerprint = config.get(R.FROZEN_FINGERPRINT)
    if not isinstance(server_round, int) or isinstance(server_round, bool) or server_round < 1:
        raise _malformed(f"its {R.SERVER_ROUND} is not a round number.")
    if not isinstance(run_key, str) or not RUN_KEY.fullmatch(run_key):
        raise _malformed(f"its {R.RUN_KEY} is not 1 to 128 letters, digits, '.', '_' or '-'.")
    if not isinstance(fingerprint, str) or not FINGERPRINT.fullmatch(fingerprint):
        raise _malformed(f"its {R.FROZEN_FINGERPRINT} is not a SHA-256 (64 hex digits).")
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
    return RoundRequest(
        server_round=server_round,
        run_key=run_key,
        frozen_fingerprint=fingerprint,
        parameters=parameters,
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
    ablation = {
        key: float(getattr(getattr(a, keep), metric)) if a else math.nan
        for key, keep, metric in (
            (R.ACCURACY_BOTH, "both", "accuracy"),
            (R.AUROC_BOTH, "both", "auroc"),
            (R.ACCURACY_IMAGE_ONLY, "image", "accuracy"),
            (R.AUROC_IMAGE_ONLY, "image", "auroc"),
            (R.ACCURACY_TEXT_ONLY, "text", "accuracy"),
            (R.AUROC_TEXT_ONLY, "text", "auroc"),
        )
    }
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
