"""What a hospital does in one round: check, train locally (with DP), evaluate.

Plain functions called by the ClientApp handlers. The model and a site's data are built once
per process and reused across rounds (a model load takes seconds); the caches are keyed by every
argument that shapes them, and every round first loads the global trainable parameters, so state
never carries from one site or round to the next.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from common.config import ModelConfig, RunConfig, SiteConfig
from common.data import ManifestDataset, ManifestError, read_manifest, split_by_patient
from common.encoders import load_tokenizer
from common.metrics import Metrics
from common.model import (
    FusionModel,
    build_model,
    frozen_fingerprint,
    load_trainable_state,
    resolve_model_config,
    trainable_state,
)
from common.privacy import (
    Ledger,
    calibrate_noise,
    local_steps,
    private_training,
    sample_rate,
    updated_ledger,
)
from common.train import TrainResult, evaluate, pick_device, train

log = logging.getLogger(__name__)


class SiteError(RuntimeError):
    """A site cannot take part in this round; the message says why (the caller names the site)."""


@dataclass(frozen=True)
class RoundInstructions:
    """What the server asks of a site this round (from the round's ConfigRecord)."""

    server_round: int
    num_rounds: int
    learning_rate: float
    frozen_fingerprint: str
    dp: bool
    target_epsilon: float
    target_delta: float


@dataclass(frozen=True)
class SiteData:
    """A site's checked data, split by patient."""

    manifest: Path
    train: ManifestDataset
    val: ManifestDataset


@dataclass(frozen=True)
class ModelBundle:
    """A built model, its tokenizer and the fingerprint of its frozen part."""

    model: FusionModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str


@dataclass(frozen=True)
class TrainOutcome:
    """A site's round: the trained parameters, what training did, and the updated ledger."""

    state: dict[str, torch.Tensor]
    result: TrainResult
    num_examples: int
    ledger: Ledger | None  # None when the round trained without DP


@functools.lru_cache(maxsize=2)
def model_bundle(config: ModelConfig) -> ModelBundle:
    """Build (once per process and config) the model, tokenizer and frozen fingerprint."""
    resolved = resolve_model_config(config)
    model = build_model(resolved)
    return ModelBundle(model, load_tokenizer(resolved.text_encoder), frozen_fingerprint(model))


@functools.lru_cache(maxsize=16)
def site_data(site: SiteConfig, run: RunConfig) -> SiteData:
    """Read, check and split a site's manifest (once per process, site and run config)."""
    model_cfg = resolve_model_config(run.model)
    try:
        manifest, rows = read_manifest(site.manifest, model_cfg.class_names)
    except ManifestError as err:
        raise SiteError(f"unusable data: {err}") from err
    train_rows, val_rows = split_by_patient(rows, run.data.val_fraction, model_cfg.seed)
    if not train_rows:
        raise SiteError(f"no training rows left after the validation split of {manifest}.")
    tokenizer = model_bundle(run.model).tokenizer

    def dataset(rows_: list) -> ManifestDataset:
        return ManifestDataset(manifest, rows_, model_cfg.class_names, tokenizer,
                               model_cfg.image_size, model_cfg.max_text_length)

    log.info("site %s: %d train / %d val rows from %s", site.site_name, len(train_rows),
             len(val_rows), manifest)
    return SiteData(manifest, dataset(train_rows), dataset(val_rows))


def plan_ledger(run: RunConfig, instructions: RoundInstructions, num_examples: int) -> Ledger:
    """A fresh ledger for this run: the noise multiplier calibrated once for all planned rounds."""
    b, e = run.train.batch_size, run.train.local_epochs
    q = sample_rate(num_examples=num_examples, batch_size=b)
    total = instructions.num_rounds * local_steps(num_examples=num_examples, batch_size=b, epochs=e)
    sigma = calibrate_noise(target_epsilon=instructions.target_epsilon,
                            target_delta=instructions.target_delta, sample_rate=q,
                            total_steps=total, accountant=run.privacy.accountant)
    return Ledger(run.privacy.accountant, instructions.target_delta, sigma, q)


def _prepare(bundle: ModelBundle, site: SiteConfig, global_state: dict[str, torch.Tensor],
             fingerprint: str | None, device: torch.device) -> FusionModel:
    if fingerprint is not None and fingerprint != bundle.fingerprint:
        raise SiteError(
            f"the frozen part of this site's model (fingerprint "
            f"{bundle.fingerprint[:12]}) differs from the server's ({fingerprint[:12]}). Server and "
            "sites must use the same preset, encoders, weights and seed.")
    model = bundle.model.to(device)
    load_trainable_state(model, global_state)
    return model


def train_round(run: RunConfig, site: SiteConfig, global_state: dict[str, torch.Tensor],
                instructions: RoundInstructions, ledger: Ledger | None) -> TrainOutcome:
    """Train the global model on this site's data for one round (DP-SGD when asked)."""
    bundle, data = model_bundle(run.model), site_data(site, run)
    device = pick_device(run.train.device)
    model = _prepare(bundle, site, global_state, instructions.frozen_fingerprint, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=instructions.learning_rate, momentum=0.9)
    loader = DataLoader(data.train, batch_size=run.train.batch_size, shuffle=True,
                        num_workers=run.data.num_workers)
    n = len(data.train)
    if not instructions.dp:
        torch.manual_seed(run.model.seed * 100_003 + instructions.server_round)  # reproducible
        result = train(model, loader, optimizer, torch.nn.CrossEntropyLoss(),
                       epochs=run.train.local_epochs, device=device)
        return TrainOutcome(trainable_state(model), result, n, None)
    # DP's randomness (Poisson sampling, noise) must be secret: a server that knew the seed could
    # regenerate the noise and subtract it. Reseed from the operating system's entropy.
    torch.seed()
    ledger = ledger or plan_ledger(run, instructions, n)
    with private_training(model, optimizer, loader, ledger, max_grad_norm=run.privacy.max_grad_norm,
                          grad_sample_mode=run.privacy.grad_sample_mode) as session:
        result = train(model, session.loader, session.optimizer, session.criterion,
                       epochs=run.train.local_epochs, device=device)
        ledger = updated_ledger(ledger, session.engine)
    return TrainOutcome(trainable_state(model), result, n, ledger)


def evaluate_round(run: RunConfig, site: SiteConfig, global_state: dict[str, torch.Tensor],
                   fingerprint: str | None) -> Metrics:
    """Evaluate the global model on this site's validation split."""
    bundle, data = model_bundle(run.model), site_data(site, run)
    device = pick_device(run.train.device)
    model = _prepare(bundle, site, global_state, fingerprint, device)
    loader = DataLoader(data.val, batch_size=max(run.train.batch_size, 64),
                        num_workers=run.data.num_workers)
    return evaluate(model, loader, device)


def epsilon_or_inf(ledger: Ledger | None) -> float:
    """The cumulative epsilon to report: inf when the site trained without DP."""
    return math.inf if ledger is None else ledger.epsilon
