"""One round at a hospital: check its privacy terms, train locally (DP-SGD), charge its ledger and
write a receipt before anything is sent; or evaluate the global model on its validation split
and release noisy score counts, charged the same way.

Plain functions (no Flower) called by the ClientApp handlers, on the site's warm state
(`client.state.SiteState`). Every round first loads the received global trainable parameters
into the site's own model, so nothing carries over from one round to the next but the ledger.
Nothing computed on private rows leaves without noise charged to the site's account, unless the
site's policy releases it exactly (`exact-metrics`, a simulated hospital played by the researcher).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from client.site_config import SiteConfig
from client.state import ModelBundle, SiteData, SiteState
from common.config import RunConfig
from common.errors import ConfigurationError, Failure, Refusal
from common.model.feature_cache import CachedFusion, CacheKey
from common.model.fusion_model import FusionModel
from common.model.modalities import frozen, untrained_parameters
from common.model.trainable import load_trainable_state, trainable_state
from common.privacy.accounting import Account, HistoryEntry, epsilon_from_history
from common.privacy.dpsgd import private_training
from common.privacy.enforcement import (
    LocalPlan,
    PrivacyTerms,
    authorize_release,
    authorize_round,
    check_round_count,
    negotiate,
)
from common.privacy.ledger import (
    LEDGER_FILE,
    Ledger,
    RunEntry,
    exclusive,
    load_ledger,
    save_ledger,
)
from common.privacy.lineage import related, remember
from common.privacy.policy import SitePolicy, load_policy
from common.privacy.receipts import (
    EVALUATE,
    RECEIPTS_FILE,
    TRAIN,
    TRAIN_LOSS,
    Receipt,
    append_receipt,
    read_receipts,
)
from common.privacy.release import (
    CountsRelease,
    release_counts,
    release_entry,
    release_mean_loss,
)
from common.privacy.replay import SENT_FOLDER, SentUpdate, load_sent, save_sent
from common.protocol import update_digest
from common.training.ablation import (
    Ablation,
    ablation_scores,
    exact_metrics,
    log_ablation,
    view_counts,
)
from common.training.loop import FixedSteps, TrainResult, pick_device, predict_logits, train
from common.training.metrics import Metrics
from common.training.score_counts import metrics_from_counts

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
    untrained: tuple[str, ...]  # frozen for the round: neither the optimizer nor DP noise moves them
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
            "encoders, weights and seed.", reason="model-mismatch")


def check_labels(policy: SitePolicy, run: RunConfig) -> None:
    """A run must name every label the site publishes (decided before any row is read).

    Whether the site holds rows of a label is then never visible: a run that leaves out a
    published label is refused the same way whatever the site holds.
    """
    missing = [label for label in policy.labels if label not in run.model.class_names]
    if missing:
        raise Refusal(f"the run's class-names {list(run.model.class_names)} leave out the "
                      f"label(s) {missing} that this site's policy publishes (labels = "
                      f"{list(policy.labels)}).", reason="labels-not-covered")


def _prepare(bundle: ModelBundle, parameters: Parameters, device: torch.device) -> FusionModel:
    model = bundle.model.to(device)
    load_trainable_state(model, parameters)
    return model


def local_plan(run: RunConfig, data: SiteData) -> LocalPlan:
    """How this site trains each round of the run (what its account is planned for)."""
    return LocalPlan(num_examples=len(data.train), batch_size=run.train.batch_size,
                     epochs=run.train.local_epochs, steps_per_round=run.train.local_steps)


def prior_spend(site: SiteConfig, ledger: Ledger, terms: PrivacyTerms, data: SiteData,
                run_key: str) -> list[HistoryEntry]:
    """What earlier runs spent on records this run uses (`budget-scope = "dataset"`), else nothing."""
    if terms.budget_scope != "dataset":
        return []
    versions = related(site.state_dir, data.version, data.record_keys, ledger.datasets())
    return ledger.prior_history(versions, run_key)


def train_round(state: SiteState, run: RunConfig, request: RoundRequest) -> TrainOutcome:
    """One round at a site: check the privacy terms, train, charge the ledger, write a receipt.

    Raises Refusal (nothing trained, nothing charged) when the site's policy forbids the round.
    The ledger and the receipt are on disk before this returns, so before any reply.
    """
    site = state.site
    policy = site_policy(site, run)
    check_round_number(run, request)
    check_labels(policy, run)
    with state.lock:
        bundle, data = state.bundle(run.model), state.data(run)
        site.limits.check_round(run, num_examples=len(data.train))  # the node's max-steps
        check_fingerprint(bundle, request.frozen_fingerprint)  # before any privacy work
        terms = negotiate(policy, run, dp=run.privacy.dp, target_epsilon=run.privacy.target_epsilon,
                          target_delta=run.privacy.target_delta,
                          num_rounds=run.federation.num_server_rounds, num_examples=len(data.train))
        global_sha256 = update_digest(request.parameters)
        with exclusive(site.state_dir):  # from reading the ledger to writing it: one round at a time
            ledger = site_ledger(site)
            entry = admitted(ledger, request, data)
            if entry and request.server_round in entry.rounds:
                again = _send_again(site, request, global_sha256)
                if again:
                    sent, receipt = again
                    not_sent = tuple(n for n in request.parameters if n not in sent.state)
                    return TrainOutcome(state=sent.state, untrained=not_sent, result=sent.result,
                                        num_examples=len(data.train), account=entry.account,
                                        receipt=receipt, policy=policy, terms=terms)
            prior = prior_spend(site, ledger, terms, data, request.run_key)
            if terms.dp:
                account = authorize_round(terms, entry, prior, policy, local_plan(run, data))
            else:
                account = None
                check_round_count(entry, policy)
            work = LocalWork(server_round=request.server_round, start=request.parameters,
                             untrained=tuple(untrained_parameters(bundle.model, data.train_combos)),
                             account=account, max_grad_norm=terms.max_grad_norm)
            local = train_locally(state, run, work)
            remember(site.state_dir, data.version, data.record_keys)
            receipt = charge(site, ledger, request=request, dataset=data.version, local=local,
                             prior=prior, budget_scope=terms.budget_scope)
            train_loss = _released_train_loss(state, run, request, policy, terms, prior, local)
            save_sent(site.state_dir, request.run_key,
                      SentUpdate(server_round=request.server_round, global_sha256=global_sha256,
                                 state=local.sent, result=local.result))
    return TrainOutcome(state=local.sent, untrained=work.untrained, result=local.result,
                        num_examples=len(data.train), account=local.account, receipt=receipt,
                        policy=policy, terms=terms, train_loss=train_loss)


def check_round_number(run: RunConfig, request: RoundRequest) -> None:
    """A round number beyond the run's planned rounds is not a round of this run."""
    if not 1 <= request.server_round <= run.federation.num_server_rounds:
        raise ConfigurationError(f"round {request.server_round} is not among the run's "
                                 f"{run.federation.num_server_rounds} rounds.", reason="message")


def site_ledger(site: SiteConfig) -> Ledger:
    """The site's ledger; refuses while receipts or sent updates exist without it.

    A ledger deleted beside its receipts would give the site a fresh budget: the site stops
    until its operator rebuilds the ledger from the receipts (`fedfusion privacy rebuild-ledger`).
    """
    ledger_file = site.state_dir / LEDGER_FILE
    sent = site.state_dir / SENT_FOLDER
    if not ledger_file.exists() and ((site.state_dir / RECEIPTS_FILE).exists()
                                     or (sent.is_dir() and any(sent.iterdir()))):
        raise Refusal(f"{site.state_dir} holds privacy receipts or sent updates but no "
                      f"{LEDGER_FILE}: the spend they record would be forgotten. Restore the "
                      "ledger from a backup, or rebuild it from the receipts with `fedfusion "
                      f"privacy rebuild-ledger {site.state_dir} --reason ...`.",
                      reason="state-incomplete")
    return load_ledger(site.state_dir)


def admitted(ledger: Ledger, request: RoundRequest, data: SiteData) -> RunEntry | None:
    """The run's ledger entry, once the run key is the Flower run's and the data is the run's."""
    bound = ledger.run_key_of(request.flower_run_id)
    if bound is not None and bound != request.run_key:
        raise Refusal(f"Flower run {request.flower_run_id} trains at this site under run key "
                      f"{bound!r}; a second run key ({request.run_key!r}) in the same run would "
                      "start a second budget.", reason="run-key-conflict")
    entry = ledger.run(request.run_key)
    if entry and entry.dataset != data.version and (entry.rounds or entry.evaluated):
        raise Refusal(f"the site's data ({data.manifest}) changed during this run; its privacy "
                      "plan no longer holds. Restore the data or start a new run.",
                      reason="data-changed")
    return entry


def _send_again(site: SiteConfig, request: RoundRequest,
                global_sha256: str) -> tuple[SentUpdate, Receipt] | None:
    """The update this site sent for the round from the same global parameters, if kept.

    A resumed server asks a round again; the same update is sent and nothing new is spent.
    """
    sent = load_sent(site.state_dir, request.run_key)
    if (sent is None or sent.server_round != request.server_round
            or sent.global_sha256 != global_sha256):
        return None
    receipts = [r for r in read_receipts(site.state_dir)
                if r.run_id == request.run_key and r.round == request.server_round
                and r.kind == TRAIN]
    if not receipts or receipts[-1].update_sha256 != update_digest(sent.state):
        return None
    log.info("site %s: round %d asked again from the same global parameters; sending the update "
             "already sent and charged (nothing new is spent)", site.site_name, request.server_round)
    return sent, receipts[-1]


def train_locally(state: SiteState, run: RunConfig, work: LocalWork) -> LocalResult:
    """Local epochs from `work.start` with `work.untrained` frozen: DP-SGD when it has an account."""
    deadline = state.site.limits.deadline()  # the node's max-round-seconds: past it, none is sent
    bundle, data = state.bundle(run.model), state.data(run)
    device = pick_device(state.site.device)
    model = _prepare(bundle, work.start, device)
    with frozen(model, work.untrained):  # neither the optimizer nor DP noise touches them
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=run.train.learning_rate, momentum=run.train.momentum)
        net, train_set = _training_net(state, run, bundle, data, model, device)
        loader = DataLoader(train_set, batch_size=run.train.batch_size, shuffle=True,
                            num_workers=run.data.num_workers)
        desc = f"{state.site.site_name} round {work.server_round} train"
        mu = run.aggregation.proximal_mu if run.aggregation.strategy == "fedprox" else 0.0
        steps = run.train.local_steps  # > 0: this many steps whatever the site's size (one "epoch")
        epochs = 1 if steps else run.train.local_epochs
        if work.account is None:
            torch.manual_seed(run.model.seed * 100_003 + work.server_round)  # reproducible
            # the batch gradient is clipped like DP-SGD's per-sample ones: one learning rate fits both
            timed = deadline.bound(FixedSteps(loader, steps) if steps else loader)
            result = train(net, timed, optimizer,
                           torch.nn.CrossEntropyLoss(), epochs=epochs,
                           device=device, clip_grad_norm=work.max_grad_norm, proximal_mu=mu,
                           desc=desc)
            return LocalResult(result=result, account=None, sent=trainable_state(model))
        # DP's randomness (Poisson sampling, noise) must be secret: a server that knew the seed
        # could regenerate the noise and subtract it. Reseed from the operating system's entropy.
        torch.seed()
        with private_training(net, optimizer, loader, work.account, max_grad_norm=work.max_grad_norm,
                              grad_sample_mode=run.privacy.grad_sample_mode) as session:
            dp_loader = deadline.bound(FixedSteps(session.loader, steps) if steps
                                       else session.loader)
            result = train(net, dp_loader, session.optimizer, session.criterion,
                           epochs=epochs, device=device, proximal_mu=mu, desc=desc)
            account = session.spent(work.account)
        sent = trainable_state(model)
        if not all(torch.isfinite(t).all() for t in sent.values()):
            # unreachable with every record's contribution bounded (common.privacy.dpsgd); never sent
            raise Failure("local training produced non-finite parameters; nothing is sent.",
                          reason="interrupted")
        return LocalResult(result=result, account=account, sent=sent)


def _training_net(state: SiteState, run: RunConfig, bundle: ModelBundle, data: SiteData,
                  model: FusionModel, device: torch.device) -> tuple[torch.nn.Module, object]:
    """What trains and on what: the cached frozen features when the run caches them."""
    if not run.train.feature_cache:
        return model, data.train
    # the frozen fronts run once per dataset version and frozen part
    return CachedFusion(model), state.features.get(_cache_key(run, bundle, data), model,
                                                   data.train, device)


def _cache_key(run: RunConfig, bundle: ModelBundle, data: SiteData) -> CacheKey:
    """What this site's cached frozen outputs of its training split depend on."""
    return CacheKey.for_model(run.model, dataset_sha256=data.version, split="train",
                              frozen_fingerprint=bundle.fingerprint)


def charge(site: SiteConfig, ledger: Ledger, *, request: RoundRequest, dataset: str,
           local: LocalResult, prior: list[HistoryEntry], budget_scope: str) -> Receipt:
    """Persist this round's spend (ledger first, then the receipt) before anything is sent.

    A round without DP keeps the run's DP account (its history is never lost) and is recorded
    as unprotected.
    """
    entry = ledger.run(request.run_key) or RunEntry(dataset=dataset, account=None)
    account = local.account or entry.account
    save_ledger(site.state_dir, ledger.with_run(request.run_key, replace(
        entry, dataset=dataset, account=account, rounds=(*entry.rounds, request.server_round),
        unprotected_rounds=entry.unprotected_rounds + (() if local.account else (request.server_round,)),
        flower_runs=_with(entry.flower_runs, request.flower_run_id))))
    dp = local.account
    last = dp.history[-1] if dp else (0.0, 0.0, 0)
    before = entry.account.steps if entry.account else 0
    receipt = Receipt(
        run_id=request.run_key, round=request.server_round, noise_multiplier=last[0],
        sample_rate=last[1], steps=(dp.steps - before) if dp else 0,
        accountant=dp.accountant if dp else "none", epsilon=dp.epsilon if dp else None,
        delta=dp.delta if dp else None, scope_epsilon=_scope_epsilon(dp, prior),
        budget_scope=budget_scope, update_sha256=update_digest(local.sent),
        dataset_sha256=dataset, time=Receipt.now(), kind=TRAIN)
    append_receipt(site.state_dir, receipt)
    return receipt


def _scope_epsilon(account: Account | None, prior: list[HistoryEntry]) -> float | None:
    """The epsilon over the budget scope: the run's, composed with the earlier runs' spend."""
    if account is None:
        return None
    if not prior:
        return account.epsilon
    return epsilon_from_history([*prior, *account.history], delta=account.delta,
                                accountant=account.accountant)


def _with(values: tuple[int, ...], value: int) -> tuple[int, ...]:
    return values if value in values else (*values, value)


@dataclass(frozen=True, kw_only=True)
class Release:
    """One charged release of a round (an evaluation, a training loss), for the ledger and receipt."""

    request: RoundRequest
    kind: str  # common.privacy.receipts.KINDS
    account: Account  # before the release
    sha256: str  # of exactly what is released


def charge_release(site: SiteConfig, ledger: Ledger, release: Release, *, dataset: str,
                   prior: list[HistoryEntry], budget_scope: str) -> Account:
    """Persist one release's spend (ledger, then receipt) before it is sent; the account after it."""
    request = release.request
    account = release.account.after([*release.account.history,
                                     release_entry(release.account.release_noise_multiplier)])
    entry = ledger.run(request.run_key) or RunEntry(dataset=dataset, account=None)
    evaluated = entry.evaluated + ((request.server_round,) if release.kind == EVALUATE else ())
    save_ledger(site.state_dir, ledger.with_run(request.run_key, replace(
        entry, dataset=dataset, account=account, evaluated=evaluated,
        flower_runs=_with(entry.flower_runs, request.flower_run_id))))
    append_receipt(site.state_dir, Receipt(
        run_id=request.run_key, round=request.server_round,
        noise_multiplier=account.release_noise_multiplier, sample_rate=1.0, steps=1,
        accountant=account.accountant, epsilon=account.epsilon, delta=account.delta,
        scope_epsilon=_scope_epsilon(account, prior), budget_scope=budget_scope,
        update_sha256=release.sha256, dataset_sha256=dataset, time=Receipt.now(),
        kind=release.kind))
    return account


def _released_train_loss(state: SiteState, run: RunConfig, request: RoundRequest,
                         policy: SitePolicy, terms: PrivacyTerms, prior: list[HistoryEntry],
                         local: LocalResult) -> float:
    """The training loss as the site releases it: withheld (nan) unless its policy shares it,
    then exact (exact-metrics, or a round without DP) or noisy and charged.

    Called under the state folder's lock, after the round's own charge.
    """
    if not (policy.share_metrics and policy.share_train_loss):
        return math.nan
    if not terms.private_releases or local.account is None:
        return round(float(local.result.loss), policy.metric_decimals)
    site, data = state.site, state.data(run)
    ledger = load_ledger(site.state_dir)
    account = authorize_release(terms, ledger.run(request.run_key), prior, local_plan(run, data))
    losses = _row_losses(state, run, {**request.parameters, **local.sent})
    loss = release_mean_loss(losses, noise_multiplier=account.release_noise_multiplier)
    charge_release(site, ledger, Release(request=request, kind=TRAIN_LOSS, account=account,
                                         sha256=update_digest({"train-loss": np.array([loss])})),
                   dataset=data.version, prior=prior, budget_scope=terms.budget_scope)
    return loss


def _row_losses(state: SiteState, run: RunConfig, parameters: Parameters) -> np.ndarray:
    """Each training row's loss (N,) under `parameters` (the model the site just trained)."""
    bundle, data = state.bundle(run.model), state.data(run)
    device = pick_device(state.site.device)
    model = _prepare(bundle, parameters, device)
    net, rows = _training_net(state, run, bundle, data, model, device)
    logits, labels = predict_logits(net, DataLoader(rows, batch_size=max(run.train.batch_size, 64)),
                                    device, desc=f"{state.site.site_name} training loss")
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()


@dataclass(frozen=True, kw_only=True)
class SiteEvaluation:
    """What a site releases of an evaluation: its metrics, the ablation, and the score counts."""

    metrics: Metrics  # from the released counts (or exact, with exact-metrics)
    ablation: Ablation | None  # None: withheld (share-ablation = false, or not this round)
    counts: CountsRelease  # the score counts per view, as released (noisy unless exact)


def evaluate_round(state: SiteState, run: RunConfig, request: RoundRequest) -> SiteEvaluation:
    """Evaluate the global model on this site's validation split, as its policy releases it.

    Refused when the policy shares no metrics, when the split holds fewer than
    `min-eval-records` records, when this round of this run was evaluated already (at most one
    release per planned round), or when the release would exceed the site's cap. What leaves
    are score counts with Gaussian noise, charged to the run's account like a training step
    (`common.privacy.release`), and the metrics computed from them; the exact metrics go to the
    site's log. The modality ablation's views are released with the run's last round only.
    """
    site = state.site
    policy = site_policy(site, run)
    if not policy.share_metrics:
        raise Refusal("this site's policy does not share evaluation metrics (share-metrics = false).",
                      reason="metrics-withheld")
    check_round_number(run, request)
    check_labels(policy, run)
    with state.lock:
        bundle, data = state.bundle(run.model), state.data(run)
        check_fingerprint(bundle, request.frozen_fingerprint)
        if len(data.val) < policy.min_eval_records:
            raise Refusal(f"the site validates on {len(data.val)} records, fewer than its policy's "
                          f"min-eval-records = {policy.min_eval_records}.", reason="too-few-records")
        terms = negotiate(policy, run, dp=run.privacy.dp, target_epsilon=run.privacy.target_epsilon,
                          target_delta=run.privacy.target_delta,
                          num_rounds=run.federation.num_server_rounds, num_examples=len(data.train))
        with exclusive(site.state_dir):
            ledger = site_ledger(site)
            entry = admitted(ledger, request, data) or RunEntry(dataset=data.version, account=None)
            if request.server_round in entry.evaluated:
                raise Refusal(f"round {request.server_round} of this run was evaluated already.",
                              reason="evaluation-limit")
            prior = prior_spend(site, ledger, terms, data, request.run_key)
            account = (authorize_release(terms, entry, prior, local_plan(run, data))
                       if terms.private_releases else None)
            evaluation = _evaluate(state, run, request, policy, account)
            remember(site.state_dir, data.version, data.record_keys)
            if account is None:
                save_ledger(site.state_dir, ledger.with_run(request.run_key, replace(
                    entry, evaluated=(*entry.evaluated, request.server_round),
                    flower_runs=_with(entry.flower_runs, request.flower_run_id))))
            else:
                digest = update_digest({f"{view}/{name}": array
                                        for view, c in evaluation.counts.views.items()
                                        for name, array in c.arrays().items()})
                charge_release(site, ledger, Release(request=request, kind=EVALUATE,
                                                     account=account, sha256=digest),
                               dataset=data.version, prior=prior, budget_scope=terms.budget_scope)
    return evaluation


def _evaluate(state: SiteState, run: RunConfig, request: RoundRequest, policy: SitePolicy,
              account: Account | None) -> SiteEvaluation:
    """Score the validation split and form the release (noisy with an account, else exact)."""
    bundle, data, site = state.bundle(run.model), state.data(run), state.site
    device = pick_device(site.device)
    model = _prepare(bundle, request.parameters, device)
    loader = DataLoader(data.val, batch_size=max(run.train.batch_size, 64),
                        num_workers=run.data.num_workers)
    scores = ablation_scores(model, loader, device, desc=f"{site.site_name} evaluate")
    exact, exact_ablation = exact_metrics(scores)
    log_ablation(f"{site.site_name} evaluate (exact, kept at the site)", exact, exact_ablation, 0.0)
    last = request.server_round == run.federation.num_server_rounds
    with_ablation = policy.share_ablation and (last or account is None)
    views = view_counts(scores, len(run.model.class_names), ablation=with_ablation)
    counts = release_counts(views, noise_multiplier=account.release_noise_multiplier if account
                            else 0.0, views_per_row=3 if with_ablation else 1)
    if account is None:  # exact: the metrics themselves, rounded as the policy says
        decimals = policy.metric_decimals
        shared = with_ablation and exact_ablation.num_examples >= policy.min_eval_records
        ablation = Ablation(num_examples=exact_ablation.num_examples,
                            both=released(exact_ablation.both, decimals),
                            image=released(exact_ablation.image, decimals),
                            text=released(exact_ablation.text, decimals)) if shared else None
        return SiteEvaluation(metrics=released(exact, decimals), ablation=ablation, counts=counts)
    ablation = counted_ablation(counts)
    decimals = policy.metric_decimals
    return SiteEvaluation(metrics=released(counted_metrics(counts, len(data.val)), decimals),
                          ablation=replace(ablation, **{keep: released(getattr(ablation, keep),
                                                                       decimals)
                                                        for keep in ("both", "image", "text")})
                          if ablation else None, counts=counts)


def counted_metrics(counts: CountsRelease, num_examples: int) -> Metrics:
    """The metrics over every validation row, from released counts."""
    views = counts.views
    return metrics_from_counts(views["lacking"] + views["both"], num_examples=num_examples)


def counted_ablation(counts: CountsRelease) -> Ablation | None:
    """The ablation from released counts (None when they hold no ablation views)."""
    views = counts.views
    if "image" not in views:
        return None
    rows = max(int(round(float(views["both"].scores[0].sum()))), 0)
    return Ablation(num_examples=rows,
                    **{keep: metrics_from_counts(views[keep], num_examples=max(rows, 1))
                       for keep in ("both", "image", "text")})


def released(metrics: Metrics, decimals: int) -> Metrics:
    """Metrics as a site releases them: rounded to `decimals`."""
    return replace(metrics, loss=round(metrics.loss, decimals),
                   accuracy=round(metrics.accuracy, decimals), auroc=round(metrics.auroc, decimals),
                   f1=round(metrics.f1, decimals))
