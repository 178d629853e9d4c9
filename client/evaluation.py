"""Evaluation at a hospital: score the global model on the site's validation split and release
noisy score counts, charged to its privacy books like a training step.

Plain functions (no Flower) called by the ClientApp's evaluate handler, on the site's warm state.
What leaves is a Gaussian mechanism of the counts (`common.privacy.release`) and the metrics
computed from them; the exact metrics stay in the site's log, unless the site's policy releases
them exactly (`exact-metrics`, a simulated hospital played by the researcher).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch.utils.data import ConcatDataset, DataLoader

from client.rounds import (
    RoundRequest,
    check_fingerprint,
    check_request,
    load_global,
    local_plan,
    log_release,
    open_books,
    site_policy,
    site_terms,
)
from client.state import SiteData, SiteState
from common.config import RunConfig
from common.data.dataset import Case, ManifestDataset
from common.errors import Refusal
from common.privacy.accounting import Account
from common.privacy.ledger import exclusive
from common.privacy.policy import SitePolicy
from common.privacy.receipts import EVALUATE
from common.privacy.release import CountsRelease, release_counts
from common.protocol import update_digest
from common.training.ablation import (
    ABLATION_VIEWS,
    FIELDS_VIEWS,
    Ablation,
    ablation_scores,
    exact_metrics,
    log_ablation,
    view_counts,
    views_per_row,
)
from common.training.loop import pick_device
from common.training.metrics import Metrics
from common.training.score_counts import metrics_from_counts


@dataclass(frozen=True, kw_only=True)
class SiteEvaluation:
    """What a site releases of an evaluation: its metrics, the ablation, and the score counts."""

    metrics: Metrics  # from the released counts (or exact, with exact-metrics)
    ablation: Ablation | None  # None: withheld (share-ablation = false, or not this round)
    counts: CountsRelease  # the score counts per view, as released (noisy unless exact)
    external: bool = False  # an evaluation-only site: every record held out (external validation)


def evaluation_rows(data: SiteData, policy: SitePolicy) -> ConcatDataset[Case] | ManifestDataset:
    """The records a site evaluates on: its validation split; all of them at an evaluation-only
    site (it never trains, so every record is held out)."""
    return ConcatDataset([data.train, data.val]) if policy.evaluate_only else data.val


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
        raise Refusal(
            "this site's policy does not share evaluation metrics (share-metrics = false).",
            reason="metrics-withheld",
        )
    check_request(policy, run, request)
    with state.lock:
        bundle, data = state.bundle(run.model), state.data(run)
        check_fingerprint(bundle, request.frozen_fingerprint)
        rows = len(evaluation_rows(data, policy))
        if rows < policy.min_eval_records:
            raise Refusal(
                f"the site validates on {rows} records, fewer than its policy's "
                f"min-eval-records = {policy.min_eval_records}.",
                reason="too-few-records",
            )
        terms = site_terms(policy, run, data)
        with exclusive(site.state_dir):
            books = open_books(site, request, data, terms)
            if books.evaluated:
                raise Refusal(
                    f"round {request.server_round} of this run was evaluated already.",
                    reason="evaluation-limit",
                )
            account = books.authorize_release(local_plan(run, data, site))
            evaluation = _evaluate(state, run, request, policy, account)
            if account is None:
                books.record_exact_evaluation()
            else:
                after = books.charge_release(
                    account,
                    kind=EVALUATE,
                    sha256=update_digest(
                        {
                            f"{view}/{name}": array
                            for view, c in evaluation.counts.views.items()
                            for name, array in c.arrays().items()
                        }
                    ),
                )
                log_release(
                    site.site_name,
                    request,
                    books,
                    what="evaluation counts released",
                    before=account,
                    after=after,
                )
    return evaluation


def _evaluate(
    state: SiteState,
    run: RunConfig,
    request: RoundRequest,
    policy: SitePolicy,
    account: Account | None,
) -> SiteEvaluation:
    """Score the validation split and form the release (noisy with an account, else exact)."""
    bundle, data, site = state.bundle(run.model), state.data(run), state.site
    device = pick_device(site.device)
    model = load_global(bundle, request.parameters, device)
    rows = evaluation_rows(data, policy)
    loader = DataLoader(
        rows, batch_size=max(run.train.batch_size, 64), num_workers=run.data.num_workers
    )
    scores = ablation_scores(model, loader, device, desc=f"{site.site_name} evaluate")
    exact, exact_ablation = exact_metrics(scores)
    log_ablation(f"{site.site_name} evaluate (exact, kept at the site)", exact, exact_ablation, 0.0)
    last = request.server_round == run.federation.num_server_rounds
    with_ablation = policy.share_ablation and (last or account is None)
    views = view_counts(scores, len(run.model.class_names), ablation=with_ablation)
    counts = release_counts(
        views,
        noise_multiplier=account.release_noise_multiplier if account else 0.0,
        views_per_row=views_per_row(views),
    )
    decimals = policy.metric_decimals
    if account is None:  # exact: the metrics themselves, rounded as the policy says
        shared = with_ablation and exact_ablation.num_examples >= policy.min_eval_records
        return SiteEvaluation(
            metrics=released(exact, decimals),
            ablation=released_ablation(exact_ablation, decimals) if shared else None,
            counts=counts,
            external=policy.evaluate_only,
        )
    ablation = counted_ablation(counts)
    return SiteEvaluation(
        metrics=released(counted_metrics(counts, len(rows)), decimals),
        ablation=released_ablation(ablation, decimals) if ablation else None,
        counts=counts,
        external=policy.evaluate_only,
    )


def counted_metrics(counts: CountsRelease, num_examples: int) -> Metrics:
    """The metrics over every validation row, from released counts."""
    views = counts.views
    return metrics_from_counts(views["lacking"] + views["both"], num_examples=num_examples)


def counted_ablation(counts: CountsRelease) -> Ablation | None:
    """The ablation from released counts (None when they hold no ablation views)."""
    views = counts.views
    if "image" not in views:
        return None
    rows = max(round(float(views["both"].scores[0].sum())), 0)
    scored = {
        keep: metrics_from_counts(views[keep], num_examples=max(rows, 1))
        for keep in ("both", *ABLATION_VIEWS, *FIELDS_VIEWS)
        if keep in views
    }
    return Ablation(
        num_examples=rows,
        both=scored["both"],
        image=scored["image"],
        text=scored["text"],
        tabular=scored.get("tabular"),
        no_tabular=scored.get("no-tabular"),
    )


def released_ablation(ablation: Ablation, decimals: int) -> Ablation:
    """An ablation as a site releases it: every view's metrics rounded to `decimals`."""
    return replace(
        ablation,
        both=released(ablation.both, decimals),
        image=released(ablation.image, decimals),
        text=released(ablation.text, decimals),
        tabular=_released_view(ablation.tabular, decimals),
        no_tabular=_released_view(ablation.no_tabular, decimals),
    )


def _released_view(metrics: Metrics | None, decimals: int) -> Metrics | None:
    return None if metrics is None else released(metrics, decimals)


def released(metrics: Metrics, decimals: int) -> Metrics:
    """Metrics as a site releases them: rounded to `decimals`."""
    return replace(
        metrics,
        loss=round(metrics.loss, decimals),
        accuracy=round(metrics.accuracy, decimals),
        auroc=round(metrics.auroc, decimals),
        f1=round(metrics.f1, decimals),
    )
