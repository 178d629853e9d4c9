"""A membership-inference audit a hospital runs on its own data against a trained model.

Members are the site's training rows, non-members its held-out rows. Two attacks, as in the
literature (Carlini et al., "Membership Inference Attacks From First Principles", 2022):
- **loss threshold** (Yeom et al. 2018): a record whose loss under the model is low is called a
  member; the score is minus the cross-entropy.
- **offline likelihood ratio (LiRA)**: reference models are trained on random halves of the
  site's rows; for each record, the references that did not train on it ("out" models) give the
  distribution of its logit-scaled confidence phi = log(p_y / (1 - p_y)) when it is not a member
  (a Gaussian: the record's own mean, the pooled spread); the score is how far into that
  distribution's upper tail the target model's phi lies (a one-sided test).
  The references retrain the part of the model a site trains (encoder tops, fusion, head) on the
  site's cached frozen features (`common.model.feature_cache`), from the model's initial state:
  seconds each, where the encoders' frozen fronts run once.

Reported per attack: the ROC AUC, the true-positive rate at 1% and 0.1% false-positive rate (a
rate below 1 / non-members cannot be resolved and is reported at FPR 0), and the worst cases:
the members the likelihood-ratio attack singles out most (their manifest rows: the result stays
at the site). Beside them the bound (epsilon, delta)-DP puts on any attack:
TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)) (Kairouz et al. 2015).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm  # type: ignore[import-untyped]  # scipy ships no type information
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from common.data.dataset import Case, Cases, PaddedText, text_length
from common.model.feature_cache import CachedFusion, FeatureSet, compute_features
from common.model.fusion_model import FusionModel, build_model
from common.model.trainable import load_trainable_state, trainable_state
from common.training.loop import predict_logits, train

log = logging.getLogger(__name__)

FPRS = (0.01, 0.001)  # the false-positive rates the audit reports TPR at
MIN_RECORDS = 4  # members and non-members each: fewer leave the audit meaningless
_CPU = torch.device("cpu")  # the audit's default device


class AuditDataError(ValueError):
    """Too few members or non-members to audit."""


@dataclass(frozen=True, kw_only=True)
class AuditSettings:
    """How the reference models are trained (they mimic the target's local training)."""

    reference_models: int = 8
    epochs: int = 10
    learning_rate: float = 0.1
    batch_size: int = 64
    seed: int = 0
    worst_cases: int = 10


@dataclass(frozen=True, kw_only=True)
class AttackResult:
    """One attack's scores (higher: more member-like) and its ROC summary."""

    name: str
    member_scores: np.ndarray  # (M,)
    non_member_scores: np.ndarray  # (N,)
    auc: float
    tpr_at: dict[float, float]  # FPR -> TPR

    @property
    def labels_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Membership labels (1: member) and scores, members first."""
        labels = np.r_[np.ones(len(self.member_scores)), np.zeros(len(self.non_member_scores))]
        return labels, np.r_[self.member_scores, self.non_member_scores]


@dataclass(frozen=True, kw_only=True)
class WorstCase:
    """A member the likelihood-ratio attack singles out (kept at the site)."""

    row: int  # the manifest row (line) of the record
    score: float  # LiRA score (the one-sided p-value's complement)
    loss: float  # its cross-entropy under the audited model
    above_threshold: bool  # identified at the 0.1%-FPR threshold


@dataclass(frozen=True, kw_only=True)
class DPBound:
    """What (epsilon, delta)-DP allows any attack at most."""

    epsilon: float
    delta: float
    tpr_at: dict[float, float]
    auc: float


@dataclass(frozen=True, kw_only=True)
class MembershipAudit:
    """The audit: both attacks, the worst cases and the DP bound (None without an epsilon)."""

    members: int
    non_members: int
    attacks: tuple[AttackResult, ...]
    worst_cases: tuple[WorstCase, ...]
    bound: DPBound | None
    settings: AuditSettings

    def attack(self, name: str) -> AttackResult:
        """The attack named `name` (`loss` or `lira`)."""
        return next(a for a in self.attacks if a.name == name)


# --- the ROC numbers --------------------------------------------------------------------------


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """The highest TPR of a threshold whose FPR is at most `fpr` (FPR 0 when finer than 1/N)."""
    fprs, tprs, _ = roc_curve(labels, scores)
    ok = fprs <= fpr + 1e-12
    return float(tprs[ok].max()) if ok.any() else 0.0


def attack_result(name: str, members: np.ndarray, non_members: np.ndarray) -> AttackResult:
    """AUC and TPR at `FPRS` of scores for members and non-members."""
    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    scores = np.r_[members, non_members]
    return AttackResult(
        name=name,
        member_scores=members,
        non_member_scores=non_members,
        auc=float(roc_auc_score(labels, scores)),
        tpr_at={f: tpr_at_fpr(labels, scores, f) for f in FPRS},
    )


def dp_tpr_bound(fpr: float, epsilon: float, delta: float) -> float:
    """The most TPR any attack reaches at `fpr` against an (epsilon, delta)-DP mechanism."""
    if not math.isfinite(epsilon):
        return 1.0
    e = math.exp(min(epsilon, 700.0))
    return float(min(1.0, e * fpr + delta, 1.0 - (1.0 - delta - fpr) / e))


def dp_bound(epsilon: float, delta: float) -> DPBound:
    """TPR at `FPRS` and the ROC AUC of the most powerful attack DP allows."""
    grid = np.linspace(0.0, 1.0, 20_001)
    curve = np.array([dp_tpr_bound(float(x), epsilon, delta) for x in grid])
    return DPBound(
        epsilon=epsilon,
        delta=delta,
        tpr_at={f: dp_tpr_bound(f, epsilon, delta) for f in FPRS},
        auc=float(np.trapezoid(curve, grid)),
    )


# --- per-record statistics of a model --------------------------------------------------------


def _losses_and_phi(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy (N,) and phi = log(p_y / (1 - p_y)) (N,), computed stably from logits."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    true = log_probs.gather(1, labels.view(-1, 1)).squeeze(1)
    others = log_probs.clone()
    others.scatter_(1, labels.view(-1, 1), -math.inf)
    phi = true - torch.logsumexp(others, dim=-1)
    return (-true).numpy(), phi.numpy()


def _logits(
    net: CachedFusion, features: Dataset[Case], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return predict_logits(net, DataLoader(features, batch_size=256), device, desc="audit")


def reference_phis(
    net: CachedFusion,
    features: FeatureSet,
    start: dict[str, torch.Tensor],
    settings: AuditSettings,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """phi (K, N) of K reference models and which records each trained on (K, N) bool.

    Each reference trains the model's trainable part from `start` on a random half of the rows,
    like the site's local training (SGD with momentum, no DP: the strongest references).
    """
    rng = np.random.default_rng(settings.seed)
    n = len(features)
    phis, inside = (
        np.zeros((settings.reference_models, n)),
        np.zeros((settings.reference_models, n), dtype=bool),
    )
    for k in range(settings.reference_models):
        chosen = rng.permutation(n)[: n // 2]
        inside[k, chosen] = True
        load_trainable_state(net.model, start)
        torch.manual_seed(settings.seed * 1000 + k)
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=settings.learning_rate, momentum=0.9)
        loader = DataLoader(
            Subset(features, chosen.tolist()), batch_size=settings.batch_size, shuffle=True
        )
        train(
            net,
            loader,
            optimizer,
            nn.CrossEntropyLoss(),
            epochs=settings.epochs,
            device=device,
            clip_grad_norm=1.0,
            desc=f"audit reference {k + 1}/{settings.reference_models}",
        )
        logits, labels = _logits(net, features, device)
        phis[k] = _losses_and_phi(logits, labels)[1]
    return phis, inside


def lira_scores(target_phi: np.ndarray, phis: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Offline LiRA: P(phi_out < phi_target) per record, phi_out ~ N(mean_out_i, pooled sigma)."""
    out = ~inside
    counts = out.sum(axis=0)
    mean = np.where(counts > 0, (phis * out).sum(axis=0) / np.maximum(counts, 1), np.nan)  # (N,)
    mean = np.where(np.isnan(mean), np.nanmean(mean) if np.isfinite(mean).any() else 0.0, mean)
    residuals = (phis - mean)[out]
    sigma = float(residuals.std()) if residuals.size > 1 else 1.0
    scores: np.ndarray = norm.cdf((target_phi - mean) / max(sigma, 1e-6))
    return scores


# --- the audit -------------------------------------------------------------------------------


def membership_audit(
    model: FusionModel,
    members: Cases,
    non_members: Cases,
    *,
    member_rows: list[int],
    settings: AuditSettings = AuditSettings(),
    epsilon: float | None = None,
    delta: float | None = None,
    device: torch.device = _CPU,
) -> MembershipAudit:
    """Audit `model` with the site's members (training rows) and non-members (held-out rows).

    `member_rows` names the members (manifest lines) for the worst cases.
    The model is left as it was given (its trainable state is restored).
    """
    if len(members) < MIN_RECORDS or len(non_members) < MIN_RECORDS:
        raise AuditDataError(
            f"the audit needs at least {MIN_RECORDS} members and non-members; "
            f"got {len(members)} training and {len(non_members)} held-out rows."
        )
    model = model.to(device)
    net = CachedFusion(model)
    target_state = trainable_state(model)
    length = max(text_length(members), text_length(non_members))  # tokenised apart: pad alike
    pool: torch.utils.data.ConcatDataset[Case] = torch.utils.data.ConcatDataset(
        [PaddedText(members, length), PaddedText(non_members, length)]
    )
    features = compute_features(net, pool, device)  # (M + N) records, members first
    m = len(members)
    logits, labels = _logits(net, features, device)
    losses, target_phi = _losses_and_phi(logits, labels)
    start = trainable_state(build_model(model.config))
    try:
        phis, inside = reference_phis(net, features, start, settings, device)
    finally:
        load_trainable_state(model, target_state)
        model.eval()
    lira = lira_scores(target_phi, phis, inside)
    attacks = (
        attack_result("loss", -losses[:m], -losses[m:]),
        attack_result("lira", lira[:m], lira[m:]),
    )
    threshold = float(np.quantile(lira[m:], 1 - min(FPRS)))
    order = np.argsort(-lira[:m])[: settings.worst_cases]
    worst = tuple(
        WorstCase(
            row=member_rows[i],
            score=float(lira[i]),
            loss=float(losses[i]),
            above_threshold=bool(lira[i] > threshold),
        )
        for i in order
    )
    bound = dp_bound(epsilon, delta if delta is not None else 0.0) if epsilon is not None else None
    log.info(
        "membership audit: %d members, %d non-members; AUC loss %.3f, LiRA %.3f",
        m,
        len(non_members),
        attacks[0].auc,
        attacks[1].auc,
    )
    return MembershipAudit(
        members=m,
        non_members=len(non_members),
        attacks=attacks,
        worst_cases=worst,
        bound=bound,
        settings=settings,
    )
