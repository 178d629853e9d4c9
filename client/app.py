"""The hospital node: a Flower ClientApp that trains and evaluates the fusion model on site data.

Handlers unpack the message, call `common.site`, and pack the reply. Only the trainable
parameters and the fixed set of scalar metrics in `common.records` leave the site, plus the
site's self-chosen name. Problems the site can explain (bad data, a model mismatch, a
configuration error, a privacy refusal) become an error reply whose reason names the site and
the cause.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from common import records as R
from common.config import ConfigError, RunConfig, SiteConfig
from common.data import ManifestError
from common.encoders import ModelLoadError
from common.enforcement import PrivacyRefusal
from common.ledger import LedgerError
from common.policy import PolicyError
from common.site import RoundInstructions, SiteError, evaluate_round, train_round

log = logging.getLogger(__name__)

app = ClientApp()

# Problems a site can explain: they become an error reply naming the site and the cause.
EXPLAINED_ERRORS = (SiteError, PrivacyRefusal, PolicyError, LedgerError, ManifestError,
                    ModelLoadError, ConfigError, ValueError)


@functools.lru_cache(maxsize=8)
def _parse_run_config(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return RunConfig.from_user_config(dict(items))


def parse_run_config(user_config: Mapping[str, Any]) -> RunConfig:
    """The run config, parsed once per distinct config (every message carries it)."""
    return _parse_run_config(tuple(sorted(user_config.items())))


def round_instructions(config: ConfigRecord) -> RoundInstructions:
    """Unpack the server's round ConfigRecord."""
    return RoundInstructions(
        server_round=int(config[R.SERVER_ROUND]),
        num_rounds=int(config[R.NUM_ROUNDS]),
        learning_rate=float(config[R.LEARNING_RATE]),
        frozen_fingerprint=str(config[R.FROZEN_FINGERPRINT]),
        dp=bool(config[R.DP]),
        target_epsilon=float(config[R.TARGET_EPSILON]),
        target_delta=float(config[R.TARGET_DELTA]),
        run_key=str(config.get(R.RUN_KEY, "")),
        proximal_mu=float(config.get(R.PROXIMAL_MU, 0.0)),
    )


def _error_reply(msg: Message, site: str, err: Exception) -> Message:
    reason = R.site_error_reason(site, str(err))
    log.error("%s", reason)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


Work = Callable[[RunConfig, SiteConfig, dict[str, torch.Tensor]], RecordDict]


def _reply(msg: Message, context: Context, user_config: Mapping[str, Any], work: Work,
           default_policy: Path | None) -> Message:
    """Parse the configs, run `work` on the received parameters, and reply (or explain why not)."""
    name = str(context.node_config.get("site-name", f"node-{context.node_id}"))
    try:
        run = parse_run_config(user_config)
        site = SiteConfig.from_node_config(context.node_config, run.data, default_policy)
        name = site.site_name
        content = work(run, site, msg.content[R.ARRAYS].to_torch_state_dict())
    except EXPLAINED_ERRORS as err:
        return _error_reply(msg, name, err)
    content[R.SITE] = ConfigRecord({R.SITE_NAME: site.site_name})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global trainable parameters on this site's data."""
    return train_reply(msg, context, context.run_config)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global parameters on this site's validation split."""
    return evaluate_reply(msg, context, context.run_config)


def train_reply(msg: Message, context: Context, user_config: Mapping[str, Any],
                default_policy: Path | None = None) -> Message:
    """Train with `common.site`; reply with the parameters it trained, the names of those it
    could not train (R.UPDATE), and TRAIN_METRICS.

    `default_policy` is for simulations: the policy of simulated hospitals that have none.
    """

    def work(run: RunConfig, site: SiteConfig, state: dict[str, torch.Tensor]) -> RecordDict:
        instructions = round_instructions(msg.content[R.CONFIG])
        # the ledger is filed under the server's run key, which survives a server restart
        outcome = train_round(run, site, state, instructions,
                              instructions.run_key or str(context.run_id))
        ledger = outcome.ledger
        return RecordDict({
            R.ARRAYS: ArrayRecord(outcome.state),  # only the parameters trained this round
            R.UPDATE: ConfigRecord({R.UNTRAINED: list(outcome.untrained)}),
            R.METRICS: MetricRecord({
                R.NUM_EXAMPLES: outcome.num_examples,
                R.TRAIN_LOSS: float(outcome.result.loss) if outcome.share_metrics else math.nan,
                R.EPSILON: float(outcome.receipt.epsilon) if ledger else math.inf,
                R.DELTA: float(ledger.delta) if ledger else 0.0,
                R.NOISE_MULTIPLIER: float(ledger.noise_multiplier) if ledger else 0.0,
                R.SAMPLE_RATE: float(ledger.sample_rate) if ledger else 0.0,
                R.STEPS: int(ledger.steps) if ledger else int(outcome.result.steps),
                R.TRAIN_SECONDS: float(outcome.result.seconds),
                R.EPSILON_CAP: float(outcome.terms.epsilon_cap) if ledger else math.inf,
                R.MAX_GRAD_NORM: float(outcome.terms.max_grad_norm),
            }),
        })

    return _reply(msg, context, user_config, work, default_policy)


def evaluate_reply(msg: Message, context: Context, user_config: Mapping[str, Any],
                   default_policy: Path | None = None) -> Message:
    """Evaluate with `common.site`; reply with EVAL_METRICS."""

    def work(run: RunConfig, site: SiteConfig, state: dict[str, torch.Tensor]) -> RecordDict:
        fingerprint = str(msg.content[R.CONFIG][R.FROZEN_FINGERPRINT])
        m = evaluate_round(run, site, state, fingerprint)
        return RecordDict({R.METRICS: MetricRecord({
            R.NUM_EXAMPLES: m.num_examples, R.LOSS: float(m.loss), R.ACCURACY: float(m.accuracy),
            R.AUROC: float(m.auroc), R.F1: float(m.f1),
        })})

    return _reply(msg, context, user_config, work, default_policy)
