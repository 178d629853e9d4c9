"""One training round at a hospital, as its story: check the request, plan the round's privacy,
train locally (DP-SGD), record the charge (ledger, then receipt), reply.

Plain functions (no Flower) called by the ClientApp's train handler, on the site's warm state
(`client.state.SiteState`). Every decision about the site's budget is made by its privacy books
(`common.privacy.books`). Every round first loads the received global trainable parameters into
the site's own model, so nothing carries over from one round to the next but the ledger.
Evaluation rounds: `client.evaluation`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from client.site_config import SiteConfig
from client.state import ModelBundle, SiteData, SiteState
from common.config import RunConfig
from common.data.dataset import ManifestDataset
from common.errors import ConfigurationError, Failure, Refusal
from common.model.feature_cache import CachedFusion, CacheKey, FeatureSet
from common.model.fusion_model import FusionModel
from common.model.modalities import frozen, untrained_parameters
from common.model.trainable import load_trainable_state, trainable_state
from common.privacy.accounting import Account, loader_batch
from common.privacy.books import Books, DataVersion, RoundKey
from common.privacy.dpsgd import private_training
from common.privacy.enforcement import LocalPlan, PrivacyTerms, negotiate, round_steps
from common.privacy.ledger import exclusive
from common.privacy.policy import SitePolicy, load_policy
from common.privacy.receipts import TRAIN_LOSS, Receipt
from common.privacy.release import release_mean_loss
from common.privacy.replay import SentUpdate
from common.protocol import update_digest
from common.training.loop import (
    FixedSteps,
    TrainResult,
    pick_device,
    predict_logits,
    train,
)

log = logging.getLogger(__name__)

Parameters = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class RoundRequest:
    """What the coordinator asks of a site this round (validated where the message enters)."""

    server_round: int
    run_key: str  # the run's name for the site's ledger, stable when the run is resumed
    frozen_fingerprint: str  # the frozen part the parameters belong to
    parameters: Parameters  # the global trainable parameters
    flower_run_id: int = 0  # the Flower run the message belongs to (its run key is bound to it)


@dataclass(frozen=True, kw_only=True)
class TrainOutcome:
    """A site's round: the trained parameters, what training did, its account and receipt."""

    state: Parameters  # the parameters trained this round: exactly what is sent
    untrained: tuple[str, ...]  # trainable parameters this site's data cannot train (not sent)
    result: TrainResult
    num_examples: int
    account: Account | None  # None when the round trained without DP
    receipt: Receipt
    policy: SitePolicy  # what the site releases of its training (decimals)
    terms: PrivacyTerms  # what the site trained under (cap, clipping norm)
    train_loss: float = math.nan  # as released: noisy, exact (exact-metrics) or nan (withheld)


@dataclass(frozen=True, kw_only=True)
class LocalWork:
    """What local training does this round: from which parameters, how, under which privacy."""

    server_round: int
    start: Parameters
    untrained: tuple[
        str, ...
    ]  # frozen for the round: neither the optimizer nor DP noise moves them
    account: Account | None  # None: plain SGD without DP
    max_grad_norm: float


@dataclass(frozen=True, kw_only=True)
class LocalResult:
    """What local training produced."""

    result: TrainResult
    account: Account | None  # after this round's steps
    sent: Parameters  # the trained parameters


def site_policy(site: SiteConfig, run: RunConfig) -> SitePolicy:
    """The site's policy file; without one, the default policy.

    A simulated hospital without a policy file is played by the researcher who chose the run's
    `dp` setting: its default policy requires DP exactly when the run asks for it.
    """
    if site.policy:
        return load_policy(site.policy)
    return SitePolicy.researcher(dp=run.privacy.dp) if site.simulated else SitePolicy()


def check_fingerprint(bundle: ModelBundle, fingerprint: str) -> None:
    """The server's frozen part must be this site's, or the trainable part means nothing here."""
    if fingerprint != bundle.fingerprint:
        raise ConfigurationError(
            f"the frozen part of this site's model (fingerprint {bundle.fingerprint[:12]}) differs "
            f"from the server's ({fingerprint[:12]}). Server and sites must use the same preset, "
            "encoders, weights and seed.",
            reason="model-mismatch",
        )


def check_labels(policy: SitePolicy, run: RunConfig) -> None:
    """A run must name every label the site publishes (decided before any row is read).

    Whether the site holds rows of a label is then never visible: a run that leaves out a
    published label is refused the same way whatever the site holds.
    """
    missing = [label for label in policy.labels if label not in run.model.class_names]
    if missing:
        raise Refusal(
            f"the run's class-names {list(run.model.class_names)} leave out the "
            f"label(s) {missing} that this site's policy publishes (labels = "
            f"{list(policy.labels)}).",
            reason="labels-not-covered",
        )


def load_global(bundle: ModelBundle, parameters: Parameters, device: torch.device) -> FusionModel:
    """The site's model on `device` with the global trainable parameters loaded."""
    model = bundle.model.to(device)
    load_trainable_state(model, parameters)
    return model


def local_plan(run: RunConfig, data: SiteData, site: SiteConfig) -> LocalPlan:
    """How this site trains each round of the run (what its account is planned for); the
    recipe raises the batch at most to the node's `max-batch`."""
    return LocalPlan(
        num_examples=len(data.train),
        batch_size=run.train.batch_size,
        epochs=run.train.local_epochs,
        steps_per_round=run.train.local_steps,
        max_noise_ratio=run.privacy.max_noise_ratio if run.privacy.dp else 0.0,
        max_batch_size=min(run.privacy.max_batch_size, site.limits.max_batch),
    )


def train_round(state: SiteState, run: RunConfig, request: RoundRequest) -> TrainOutcome:
    """One round at a site: check the request, plan its privacy, train, record the charge, reply.

    Raises Refusal (nothing trained, nothing charged) when the site's policy forbids the round.
    The ledger and the receipt are on disk before this returns, so before any reply.
    """
    site = state.site
    policy = site_policy(site, run)
    if policy.evaluate_only:  # before any row is read
        raise Refusal(
            "this site only evaluates the federation's model (evaluate-only = true in its "
            "policy): it never trains.",
            reason="evaluate-only",
        )
    if policy.secure_aggregation == "require":  # before any row is read
        raise Refusal(
            'this site trains only inside secure aggregation (secure-aggregation = "require" '
            "in its policy): the coordinator must not see its update alone. Run with "
            "secure-aggregation = true.",
            reason="secagg-required",
        )
    check_request(policy, run, request)
    with state.lock:
        bundle, data = state.bundle(run.model), state.data(run)
        site.limits.check_round(run, num_examples=len(data.train))  # the node's max-steps
        check_fingerprint(bundle, request.frozen_fingerprint)  # before any privacy work
        terms = site_terms(policy, run, data)
        global_sha256 = update_digest(request.parameters)
        with exclusive(
            site.state_dir
        ):  # from reading the ledger to writing it: one round at a time
            books = open_books(site, request, data, terms)
            before = books.entry.account if books.entry is not None else None
            again = books.resend(global_sha256) if books.trained else None
            if again:
                return _again(again, request, data, policy, terms, books)
            account = books.authorize_training(policy, local_plan(run, data, site))  # plan
            work = LocalWork(
                server_round=request.server_round,
                start=request.parameters,
                untrained=tuple(untrained_parameters(bundle.model, data.train_combos)),
                account=account,
                max_grad_norm=terms.max_grad_norm,
            )
            local = train_locally(state, run, work)  # train
            receipt = books.charge_training(local.account, sent_sha256=update_digest(local.sent))
            train_loss = _released_train_loss(state, run, request, policy, books, local)
            books.keep_sent(
                SentUpdate(
                    server_round=request.server_round,
                    global_sha256=global_sha256,
                    state=local.sent,
                    result=local.result,
                )
            )
    log_spend(site.site_name, request, receipt, terms, before=before.epsilon if before else 0.0)
    return TrainOutcome(
        state=local.sent,
        untrained=work.untrained,
        result=local.result,
        num_examples=len(data.train),
        account=local.account,
        receipt=receipt,
        policy=policy,
        terms=terms,
        train_loss=train_loss,
    )


def log_spend(
    site: str, request: RoundRequest, receipt: Receipt, terms: PrivacyTerms, *, before: float
) -> None:
    """The site's own log after a round: what it spent (`before`: the run's epsilon until now)."""
    if receipt.epsilon is None:
        log.info(
            "%s: run %s (Flower run %d) round %d: trained without DP (%d steps)",
            site,
            request.run_key,
            request.flower_run_id,
            request.server_round,
            receipt.steps,
        )
        return
    log_charge(
        site,
        request,
        terms,
        what=f"{receipt.steps} DP-SGD steps",
        spent=receipt.epsilon - before,
        run_total=receipt.epsilon,
        scope_total=receipt.scope_epsilon,
    )


def log_release(
    site: str, request: RoundRequest, books: Books, *, what: str, before: Account, after: Account
) -> None:
    """The site's own log after a charged release (evaluation counts, a training loss)."""
    log_charge(
        site,
        request,
        books.terms,
        what=what,
        spent=after.epsilon - before.epsilon,
        run_total=after.epsilon,
        scope_total=books.scope_epsilon(after),
        unit="release",
    )


def log_charge(
    site: str,
    request: RoundRequest,
    terms: PrivacyTerms,
    *,
    what: str,
    spent: float,
    run_total: float,
    scope_total: float | None,
    unit: str = "round",
) -> None:
    """One charge in the site's log: run, round, this charge, run total and cap, what is left."""
    scope = run_total if scope_total is None else scope_total
    log.info(
        "%s: run %s (Flower run %d) round %d: %s; epsilon %.3f this %s, %.3f this run (cap "
        "%.4g); %.3f of the cap %.4g over its budget scope (%s), %.3f left",
        site,
        request.run_key,
        request.flower_run_id,
        request.server_round,
        what,
        spent,
        unit,
        run_total,
        terms.run_epsilon,
        scope,
        terms.scope_epsilon,
        terms.budget_scope,
        max(terms.scope_epsilon - scope, 0.0),
    )


def check_request(policy: SitePolicy, run: RunConfig, request: RoundRequest) -> None:
    """What is decided before any row is read: the round is one of the run's, its labels covered."""
    check_round_number(run, request)
    check_labels(policy, run)


def site_terms(policy: SitePolicy, run: RunConfig, data: SiteData) -> PrivacyTerms:
    """What the site trains and releases under in this run (its policy against the run's asks)."""
    return negotiate(
        policy,
        run,
        dp=run.privacy.dp,
        target_epsilon=run.privacy.target_epsilon,
        target_delta=run.privacy.target_delta,
        num_rounds=run.federation.num_server_rounds,
        num_examples=len(data.train),
    )


def open_books(
    site: SiteConfig, request: RoundRequest, data: SiteData, terms: PrivacyTerms
) -> Books:
    """The site's privacy books, open for this round (under the state folder's lock)."""
    return Books(
        site.state_dir,
        RoundKey(
            run_key=request.run_key,
            server_round=request.server_round,
            flower_run_id=request.flower_run_id,
        ),
        DataVersion(version=data.version, record_keys=data.record_keys),
        terms,
    )


def _again(
    again: tuple[SentUpdate, Receipt],
    request: RoundRequest,
    data: SiteData,
    policy: SitePolicy,
    terms: PrivacyTerms,
    books: Books,
) -> TrainOutcome:
    """The round asked again from the same global parameters: what was sent, for no new spend."""
    sent, receipt = again
    not_sent = tuple(n for n in request.parameters if n not in sent.state)
    return TrainOutcome(
        state=sent.state,
        untrained=not_sent,
        result=sent.result,
        num_examples=len(data.train),
        account=books.entry.account if books.entry else None,
        receipt=receipt,
        policy=policy,
        terms=terms,
    )


def _batch(account: Account | None, run: RunConfig, num_examples: int) -> int:
    """The loader's batch: at the sampling rate the site's account planned (its recipe may have
    raised the run's batch-size), or the run's batch-size without DP."""
    if account is None or account.sample_rate <= 0:
        return run.train.batch_size
    return loader_batch(num_examples=num_examples, rate=account.sample_rate)


def check_round_number(run: RunConfig, request: RoundRequest) -> None:
    """A round number beyond the run's planned rounds is not a round of this run."""
    if not 1 <= request.server_round <= run.federation.num_server_rounds:
        raise ConfigurationError(
            f"round {request.server_round} is not among the run's "
            f"{run.federation.num_server_rounds} rounds.",
            reason="message",
        )


def train_locally(state: SiteState, run: RunConfig, work: LocalWork) -> LocalResult:
    """Local epochs from `work.start` with `work.untrained` frozen: DP-SGD if it has an account."""
    deadline = state.site.limits.deadline()  # the node's max-round-seconds: past it, none is sent
    bundle, data = state.bundle(run.model), state.data(run)
    device = pick_device(state.site.device)
    model = load_global(bundle, work.start, device)
    with frozen(model, work.untrained):  # neither the optimizer nor DP noise touches them
        optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad],
            lr=run.train.learning_rate,
            momentum=run.train.momentum,
        )
        net, train_set = _training_net(state, run, bundle, data, model, device)
        loader = DataLoader(
            train_set,
            batch_size=_batch(work.account, run, len(train_set)),
            shuffle=True,
            num_workers=run.data.num_workers,
        )
        desc = f"{state.site.site_name} round {work.server_round} train"
        mu = run.aggregation.proximal_mu if run.aggregation.strategy == "fedprox" else 0.0
        # > 0: this many steps whatever the site's size (one "epoch"); under DP, as many as the
        # site's recipe chose when its account was opened (at most local-steps)
        steps = (
            round_steps(work.account, local_plan(run, data, state.site))
            if run.train.local_steps
            else 0
        )
        epochs = 1 if steps else run.train.local_epochs
        if work.account is None:
            torch.manual_seed(run.model.seed * 100_003 + work.server_round)  # reproducible
            # batch gradient clipped like DP-SGD's per-sample ones: one learning rate fits both
            timed = deadline.bound(FixedSteps(loader, steps) if steps else loader)
            result = train(
                net,
                timed,
                optimizer,
                torch.nn.CrossEntropyLoss(),
                epochs=epochs,
                device=device,
                clip_grad_norm=work.max_grad_norm,
                proximal_mu=mu,
                desc=desc,
            )
            return LocalResult(result=result, account=None, sent=trainable_state(model))
        # DP's randomness (Poisson sampling, noise) must be secret: a server that knew the seed
        # could regenerate the noise and subtract it. Reseed from the operating system's entropy.
        torch.seed()
        with private_training(
            net,
            optimizer,
            loader,
            work.account,
            max_grad_norm=work.max_grad_norm,
            grad_sample_mode=run.privacy.grad_sample_mode,
        ) as session:
            dp_loader = deadline.bound(
                FixedSteps(session.loader, steps) if steps else session.loader
            )
            result = train(
                net,
                dp_loader,
                session.optimizer,
                session.criterion,
                epochs=epochs,
                device=device,
                proximal_mu=mu,
                desc=desc,
            )
            account = session.spent(work.account)
        sent = trainable_state(model)
        if not all(torch.isfinite(t).all() for t in sent.values()):
            # unreachable with each record's contribution bounded (common.privacy.dpsgd); never sent
            raise Failure(
                "local training produced non-finite parameters; nothing is sent.",
                reason="interrupted",
            )
        return LocalResult(result=result, account=account, sent=sent)


def _training_net(
    state: SiteState,
    run: RunConfig,
    bundle: ModelBundle,
    data: SiteData,
    model: FusionModel,
    device: torch.device,
) -> tuple[torch.nn.Module, ManifestDataset | FeatureSet]:
    """What trains and on what: the cached frozen features when the run caches them."""
    if not run.train.feature_cache:
        return model, data.train
    # the frozen fronts run once per dataset version and frozen part
    return CachedFusion(model), state.features.get(
        _cache_key(run, bundle, data), model, data.train, device
    )


def _cache_key(run: RunConfig, bundle: ModelBundle, data: SiteData) -> CacheKey:
    """What this site's cached frozen outputs of its training split depend on."""
    return CacheKey.for_model(
        run.model, dataset_sha256=data.version, split="train", frozen_fingerprint=bundle.fingerprint
    )


def _released_train_loss(
    state: SiteState,
    run: RunConfig,
    request: RoundRequest,
    policy: SitePolicy,
    books: Books,
    local: LocalResult,
) -> float:
    """The training loss as the site releases it: withheld (nan) unless its policy shares it,
    then exact (exact-metrics, or a round without DP) or noisy and charged.

    Called under the state folder's lock, after the round's own charge.
    """
    if not (policy.share_metrics and policy.share_train_loss):
        return math.nan
    if not books.terms.private_releases or local.account is None:
        return round(float(local.result.loss), policy.metric_decimals)
    account = books.authorize_release(local_plan(run, state.data(run), state.site))
    assert account is not None  # private releases: an account
    losses = _row_losses(state, run, {**request.parameters, **local.sent})
    loss = release_mean_loss(losses, noise_multiplier=account.release_noise_multiplier)
    after = books.charge_release(
        account, kind=TRAIN_LOSS, sha256=update_digest({"train-loss": np.array([loss])})
    )
    log_release(
        state.site.site_name,
        request,
        books,
        what="training loss released",
        before=account,
        after=after,
    )
    return loss


def _row_losses(state: SiteState, run: RunConfig, parameters: Parameters) -> np.ndarray:
    """Each training row's loss (N,) under `parameters` (the model the site just trained)."""
    bundle, data = state.bundle(run.model), state.data(run)
    device = pick_device(state.site.device)
    model = load_global(bundle, parameters, device)
    net, rows = _training_net(state, run, bundle, data, model, device)
    logits, labels = predict_logits(
        net,
        DataLoader(rows, batch_size=max(run.train.batch_size, 64)),
        device,
        desc=f"{state.site.site_name} training loss",
    )
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()
