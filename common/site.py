"""What a hospital does in one round: check its privacy terms, train locally (DP-SGD), charge
its ledger and write a receipt before anything is sent; or evaluate the global model.

Plain functions called by the ClientApp handlers. The model and a site's data are built once
per process and reused across rounds (a model load takes seconds); the caches are keyed by every
argument that shapes them, and every round first loads the global trainable parameters, so state
never carries from one site or round to the next.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from common.config import ModelConfig, RunConfig, SiteConfig
from common.data import ManifestDataset, ManifestError, read_manifest, split_by_patient
from common.encoders import load_tokenizer
from common.feature_cache import PROCESS_CACHE, CacheKey, CachedFusion
from common.metrics import Metrics
from common.modalities import Combo, frozen, modality_combos, untrained_parameters
from common.model import (
    FusionModel,
    build_model,
    frozen_fingerprint,
    load_trainable_state,
    resolve_model_config,
    trainable_state,
)
from common.enforcement import (
    PrivacyRefusal,
    PrivacyTerms,
    authorize_round,
    check_round_count,
    negotiate,
)
from common.ledger import (
    LedgerBook,
    exclusive,
    Receipt,
    RunRecord,
    append_receipt,
    file_sha256,
    load_book,
    read_receipts,
    save_book,
    update_digest,
)
from common.policy import SitePolicy, load_policy
from common.replay import SentUpdate, load_sent, save_sent
from common.privacy import HistoryEntry, Ledger, epsilon_from_history, private_training, updated_ledger
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
    run_key: str = ""  # the run's name for the ledger ("" = the caller's run id)
    proximal_mu: float = 0.0  # FedProx; 0 = plain local training


@dataclass(frozen=True)
class SiteData:
    """A site's checked data, split by patient."""

    manifest: Path
    dataset_sha256: str  # the dataset version: SHA-256 of the manifest
    train: ManifestDataset
    val: ManifestDataset
    train_combos: frozenset[Combo]  # the (has_image, has_text) combinations of the training rows


@dataclass(frozen=True)
class ModelBundle:
    """A built model, its tokenizer and the fingerprint of its frozen part."""

    model: FusionModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str


@dataclass(frozen=True)
class TrainOutcome:
    """A site's round: the trained parameters, what training did, the ledger and the receipt."""

    state: dict[str, torch.Tensor]  # the parameters trained this round: exactly what is sent
    untrained: tuple[str, ...]  # trainable parameters this site's data cannot train (not sent)
    result: TrainResult
    num_examples: int
    ledger: Ledger | None  # None when the round trained without DP
    receipt: Receipt
    share_metrics: bool  # the site's policy allows reporting its training loss
    terms: PrivacyTerms  # what the site trained under (cap, clipping norm)


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
    return SiteData(manifest, file_sha256(manifest), dataset(train_rows), dataset(val_rows),
                    modality_combos(train_rows))


def site_policy(site: SiteConfig) -> SitePolicy:
    """The site's policy file, or the default policy (DP required, no cap of its own)."""
    return load_policy(site.policy) if site.policy else SitePolicy()


def check_fingerprint(bundle: ModelBundle, fingerprint: str) -> None:
    """The server's frozen part must be this site's, or the trainable part means nothing here."""
    if fingerprint != bundle.fingerprint:
        raise SiteError(
            f"the frozen part of this site's model (fingerprint "
            f"{bundle.fingerprint[:12]}) differs from the server's ({fingerprint[:12]}). Server and "
            "sites must use the same preset, encoders, weights and seed.")


def _prepare(bundle: ModelBundle, global_state: dict[str, torch.Tensor],
             fingerprint: str, device: torch.device) -> FusionModel:
    check_fingerprint(bundle, fingerprint)
    model = bundle.model.to(device)
    load_trainable_state(model, global_state)
    return model


def train_round(run: RunConfig, site: SiteConfig, global_state: dict[str, torch.Tensor],
                instructions: RoundInstructions, run_id: str) -> TrainOutcome:
    """One round at a site: check the privacy terms, train, charge the ledger, write a receipt.

    Raises PrivacyRefusal (nothing trained, nothing charged) when the site's policy forbids the
    round. The ledger and the receipt are on disk before this returns, so before any reply.
    """
    policy = site_policy(site)
    terms = negotiate(policy, run, dp=instructions.dp, target_epsilon=instructions.target_epsilon,
                      target_delta=instructions.target_delta, num_rounds=instructions.num_rounds)
    bundle, data = model_bundle(run.model), site_data(site, run)
    check_fingerprint(bundle, instructions.frozen_fingerprint)  # before any privacy work
    global_sha256 = update_digest(global_state)
    with exclusive(site.state_dir):  # from reading the ledger to writing it: one round at a time
        book = load_book(site.state_dir)
        record = book.run(run_id)
        if record and record.dataset != data.dataset_sha256:
            raise SiteError(f"the site's data ({data.manifest}) changed during this run; its "
                            "privacy plan no longer holds. Restore the data or start a new run.")
        if record and instructions.server_round in record.rounds:
            again = _send_again(site, run_id, instructions.server_round, global_sha256)
            if again:
                sent, receipt = again
                not_sent = tuple(n for n in global_state if n not in sent.state)
                return TrainOutcome(sent.state, not_sent, sent.result, len(data.train),
                                    record.ledger, receipt, policy.share_metrics, terms)
        prior = (book.prior_history(data.dataset_sha256, run_id)
                 if terms.budget_scope == "dataset" else [])
        if terms.dp:
            ledger = authorize_round(terms, record, prior, policy, num_examples=len(data.train),
                                     batch_size=run.train.batch_size, epochs=run.train.local_epochs)
        else:
            ledger = None
            check_round_count(record, policy)
        untrained = untrained_parameters(bundle.model, data.train_combos)
        result, ledger, state = _train_locally(run, bundle, data, global_state, instructions,
                                               ledger, terms.max_grad_norm, site.site_name,
                                               untrained)
        receipt = charge(site, book, run_id, data.dataset_sha256, ledger, instructions.server_round,
                         state, prior, policy.budget_scope)
        save_sent(site.state_dir, run_id,
                  SentUpdate(instructions.server_round, global_sha256, state, result))
    return TrainOutcome(state, tuple(untrained), result, len(data.train), ledger, receipt,
                        policy.share_metrics, terms)


def _send_again(site: SiteConfig, run_id: str, server_round: int,
                global_sha256: str) -> tuple[SentUpdate, Receipt] | None:
    """The update this site sent for `server_round` from the same global parameters, if kept.

    A resumed server asks a round again; the same update is sent and nothing new is spent.
    """
    sent = load_sent(site.state_dir, run_id)
    if sent is None or sent.server_round != server_round or sent.global_sha256 != global_sha256:
        return None
    receipts = [r for r in read_receipts(site.state_dir)
                if r.run_id == run_id and r.round == server_round]
    if not receipts or receipts[-1].update_sha256 != update_digest(sent.state):
        return None
    log.info("site %s: round %d asked again from the same global parameters; sending the update "
             "already sent and charged (nothing new is spent)", site.site_name, server_round)
    return sent, receipts[-1]


def _train_locally(run: RunConfig, bundle: ModelBundle, data: SiteData,
                   global_state: dict[str, torch.Tensor], instructions: RoundInstructions,
                   ledger: Ledger | None, max_grad_norm: float, site_name: str,
                   untrained: Sequence[str] = (),
                   ) -> tuple[TrainResult, Ledger | None, dict[str, torch.Tensor]]:
    """Local epochs from the global state with `untrained` frozen; returns the trained parameters."""
    device = pick_device(run.train.device)
    model = _prepare(bundle, global_state, instructions.frozen_fingerprint, device)
    with frozen(model, untrained):  # neither the optimizer nor DP noise touches them
        return _train_prepared(run, bundle, model, data, instructions, ledger, max_grad_norm,
                               site_name, device)


def _train_prepared(run: RunConfig, bundle: ModelBundle, model: FusionModel, data: SiteData,
                    instructions: RoundInstructions, ledger: Ledger | None, max_grad_norm: float,
                    site_name: str, device: torch.device,
                    ) -> tuple[TrainResult, Ledger | None, dict[str, torch.Tensor]]:
    """DP-SGD when a ledger is given, plain SGD otherwise, on the model's trainable parameters."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=instructions.learning_rate, momentum=0.9)
    epochs = run.train.local_epochs
    desc = f"{site_name} round {instructions.server_round} train"
    net, train_set = model, data.train
    if run.train.feature_cache:  # the frozen fronts run once per dataset version and frozen part
        net, train_set = CachedFusion(model), PROCESS_CACHE.get(
            _cache_key(run, bundle, data), model, data.train, device)
    loader = DataLoader(train_set, batch_size=run.train.batch_size, shuffle=True,
                        num_workers=run.data.num_workers)
    if ledger is None:
        torch.manual_seed(run.model.seed * 100_003 + instructions.server_round)  # reproducible
        # the batch gradient is clipped like DP-SGD's per-sample ones, so one learning rate fits both
        result = train(net, loader, optimizer, torch.nn.CrossEntropyLoss(), epochs=epochs,
                       device=device, clip_grad_norm=max_grad_norm,
                       proximal_mu=instructions.proximal_mu, desc=desc)
        return result, None, trainable_state(model)
    # DP's randomness (Poisson sampling, noise) must be secret: a server that knew the seed could
    # regenerate the noise and subtract it. Reseed from the operating system's entropy.
    torch.seed()
    with private_training(net, optimizer, loader, ledger, max_grad_norm=max_grad_norm,
                          grad_sample_mode=run.privacy.grad_sample_mode) as session:
        result = train(net, session.loader, session.optimizer, session.criterion,
                       epochs=epochs, device=device, proximal_mu=instructions.proximal_mu,
                       desc=desc)
        ledger = updated_ledger(ledger, session.engine)
    return result, ledger, trainable_state(model)


def _cache_key(run: RunConfig, bundle: ModelBundle, data: SiteData) -> CacheKey:
    """What this site's cached frozen outputs of its training split depend on."""
    cfg = resolve_model_config(run.model)
    return CacheKey(data.dataset_sha256, "train", bundle.fingerprint, cfg.trainable_image_blocks,
                    cfg.trainable_text_layers, cfg.image_size, cfg.max_text_length)


def charge(site: SiteConfig, book: LedgerBook, run_id: str, dataset: str, ledger: Ledger | None,
           server_round: int, state: dict[str, torch.Tensor], prior: list[HistoryEntry],
           budget_scope: str) -> Receipt:
    """Persist this round's spend (ledger first, then the receipt) before anything is sent."""
    record = book.run(run_id)
    rounds = (record.rounds if record else ()) + (server_round,)
    save_book(site.state_dir, book.with_run(run_id, RunRecord(dataset, ledger, rounds)))
    last = ledger.history[-1] if ledger else (0.0, 0.0, 0)
    before = sum(s for _, _, s in record.ledger.history) if record and record.ledger else 0
    epsilon = ledger.epsilon if ledger else None
    receipt = Receipt(
        run_id=run_id, round=server_round, noise_multiplier=last[0], sample_rate=last[1],
        steps=(ledger.steps - before) if ledger else 0,
        accountant=ledger.accountant if ledger else "none",
        epsilon=epsilon, delta=ledger.delta if ledger else None,
        scope_epsilon=epsilon_from_history([*prior, *ledger.history], delta=ledger.delta,
                                           accountant=ledger.accountant)
        if ledger and prior else epsilon,
        budget_scope=budget_scope, update_sha256=update_digest(state), dataset_sha256=dataset,
        time=Receipt.now())
    append_receipt(site.state_dir, receipt)
    return receipt


def evaluate_round(run: RunConfig, site: SiteConfig, global_state: dict[str, torch.Tensor],
                   fingerprint: str) -> Metrics:
    """Evaluate the global model on this site's validation split (if its policy shares metrics)."""
    if not site_policy(site).share_metrics:
        raise PrivacyRefusal("this site's policy does not share evaluation metrics "
                             "(share-metrics = false).")
    bundle, data = model_bundle(run.model), site_data(site, run)
    device = pick_device(run.train.device)
    model = _prepare(bundle, global_state, fingerprint, device)
    loader = DataLoader(data.val, batch_size=max(run.train.batch_size, 64),
                        num_workers=run.data.num_workers)
    return evaluate(model, loader, device, desc=f"{site.site_name} evaluate")
