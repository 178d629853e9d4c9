"""`fedfusion privacy audit`: a hospital audits a run's final model on its own data.

The site's training rows (the patient-level split its node used: `val-fraction`, `split-seed`)
are the members, its held-out rows the non-members; the attacks are `common.privacy.membership`.
The reference models train like the run's local training (its learning rate and batch size, for
rounds x local epochs, bounded). The epsilon of the bound is the run's, from the site's ledger
(the run key is in the run folder's run-config.json), or given by hand. The result is a table
for the terminal and a self-contained page for the site's own report; both name records by
their manifest row, so they stay at the site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from common.data.dataset import ManifestDataset
from common.data.manifest import Row, read_manifest, split_by_patient
from common.errors import ConfigurationError
from common.model.checkpoint import MODEL_CONFIG, load_model
from common.model.encoders import load_tokenizer
from common.model.fusion_model import FusionModel
from common.privacy.ledger import load_ledger
from common.privacy.membership import (
    FPRS,
    AuditSettings,
    MembershipAudit,
    dp_tpr_bound,
    membership_audit,
)
from common.runfolder import RunFolder
from common.training.loop import pick_device
from common.views.plots import figure_png
from tools.report_format import Block, Heading, Image, Paragraph, Table, to_html, to_markdown

MAX_REFERENCE_EPOCHS = 200
ATTACK_NAMES = {"loss": "loss threshold", "lira": "likelihood ratio (offline LiRA)"}


class AuditError(ConfigurationError):
    """The audit cannot run; the message says what is missing and what to do."""


@dataclass(frozen=True, kw_only=True)
class SiteAudit:
    """A finished audit and what it audited."""

    run_dir: Path
    manifest: Path
    audit: MembershipAudit
    epsilon_source: str  # where the bound's epsilon came from


def site_datasets(
    model: FusionModel, manifest_path: Path, *, val_fraction: float, split_seed: int
) -> tuple[ManifestDataset, ManifestDataset, list[Row]]:
    """The site's training (members) and held-out (non-members) datasets, as its node split them."""
    cfg = model.config
    manifest, rows = read_manifest(manifest_path, cfg.class_names, fields=cfg.tabular)
    train_rows, val_rows = split_by_patient(rows, val_fraction, split_seed)
    tokenizer = load_tokenizer(cfg.text_encoder)

    def dataset(part: list[Row]) -> ManifestDataset:
        return ManifestDataset(
            manifest,
            part,
            cfg.class_names,
            tokenizer,
            cfg.image_size,
            cfg.max_text_length,
            fields=cfg.tabular,
        )

    return dataset(train_rows), dataset(val_rows), train_rows


def reference_settings(run_dir: Path, reference_models: int, seed: int) -> AuditSettings:
    """Reference models that train like the run's local training (bounded epochs)."""
    settings = RunFolder(run_dir).read_settings()
    train = settings.settings.get("train", {}) if settings else {}
    rounds = settings.settings.get("federation", {}).get("num_server_rounds", 1) if settings else 1
    epochs = min(MAX_REFERENCE_EPOCHS, int(rounds) * int(train.get("local_epochs", 2)))
    return AuditSettings(
        reference_models=reference_models,
        epochs=max(epochs, 1),
        learning_rate=float(train.get("learning_rate", 0.1)),
        batch_size=int(train.get("batch_size", 64)),
        seed=seed,
    )


def run_epsilon(run_dir: Path, state_dir: Path | None) -> tuple[float | None, float | None, str]:
    """The run's (epsilon, delta) at this site from its ledger, and a note of the source."""
    if state_dir is None:
        return None, None, "no epsilon given (--state-dir or --epsilon)"
    settings = RunFolder(run_dir).read_settings()
    if settings is None:
        raise AuditError(
            f"{run_dir} holds no run-config.json, so its run key (the ledger's "
            "entry) is unknown; pass --epsilon and --delta instead."
        )
    entry = load_ledger(state_dir).run(settings.run_key)
    if entry is None:
        raise AuditError(
            f"the ledger in {state_dir} has no entry for run {settings.run_key!r}: "
            "this site did not train in that run, or the state folder is another "
            "site's."
        )
    if entry.account is None or entry.unprotected_rounds:
        return (
            math.inf,
            0.0,
            (
                f"run {settings.run_key}: rounds "
                f"{list(entry.unprotected_rounds or entry.rounds)} without DP"
            ),
        )
    return entry.account.epsilon, entry.account.delta, f"the site's ledger, run {settings.run_key}"


def audit_site(
    run_dir: Path,
    manifest: Path,
    *,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    state_dir: Path | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    reference_models: int = 8,
    seed: int = 0,
    device: str = "auto",
) -> SiteAudit:
    """Audit the run's final model on the site's manifest."""
    if not (run_dir / MODEL_CONFIG).is_file():
        raise AuditError(
            f"{run_dir} holds no {MODEL_CONFIG}: pass the run folder of a finished "
            "run (its final model is written when the run ends)."
        )
    model = load_model(run_dir)
    members, non_members, train_rows = site_datasets(
        model, manifest, val_fraction=val_fraction, split_seed=split_seed
    )
    source = "given by hand"
    if epsilon is None:
        epsilon, ledger_delta, source = run_epsilon(run_dir, state_dir)
        delta = delta if delta is not None else ledger_delta
    result = membership_audit(
        model,
        members,
        non_members,
        member_rows=[r.line for r in train_rows],
        settings=reference_settings(run_dir, reference_models, seed),
        epsilon=epsilon,
        delta=delta,
        device=pick_device(device),
    )
    return SiteAudit(run_dir=run_dir, manifest=manifest, audit=result, epsilon_source=source)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_table(site: SiteAudit) -> str:
    """The audit as a terminal table."""
    a = site.audit
    lines = [
        f"Membership-inference audit of {site.run_dir} on {site.manifest}",
        f"{a.members} members (training rows), {a.non_members} non-members (held-out rows); "
        f"{a.settings.reference_models} reference models, {a.settings.epochs} epochs each.",
        "",
        f"{'attack':<34} {'AUC':>6} {'TPR@1%FPR':>10} {'TPR@0.1%FPR':>12}",
    ]
    for attack in a.attacks:
        lines.append(
            f"{ATTACK_NAMES[attack.name]:<34} {attack.auc:>6.3f} "
            f"{_pct(attack.tpr_at[0.01]):>10} {_pct(attack.tpr_at[0.001]):>12}"
        )
    if a.bound is not None:
        b = a.bound
        lines.append(
            f"{f'DP bound (eps {b.epsilon:.2f}, delta {b.delta:.0e})':<34} {b.auc:>6.3f} "
            f"{_pct(b.tpr_at[0.01]):>10} {_pct(b.tpr_at[0.001]):>12}"
        )
    else:
        lines.append(f"DP bound: {site.epsilon_source}.")
    if a.non_members * min(FPRS) < 1:
        lines.append(
            f"(with {a.non_members} non-members, an FPR below {1 / a.non_members:.1%} "
            "cannot be resolved: those TPRs are at FPR 0)"
        )
    lines += [
        "",
        "Most exposed members (manifest rows; this list stays at the site):",
        f"{'row':>6} {'LiRA score':>11} {'loss':>8}  identified at 0.1% FPR",
    ]
    lines += [
        f"{w.row:>6} {w.score:>11.4f} {w.loss:>8.4f}  {'yes' if w.above_threshold else 'no'}"
        for w in a.worst_cases
    ]
    return "\n".join(lines)


def _roc_figure(a: MembershipAudit) -> Figure:
    fig = Figure(figsize=(5.0, 4.5), layout="constrained")
    ax = fig.subplots()
    for attack in a.attacks:
        labels, scores = attack.labels_scores
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(
            np.maximum(fpr, 1e-4),
            np.maximum(tpr, 1e-4),
            label=f"{ATTACK_NAMES[attack.name]} (AUC {attack.auc:.3f})",
        )
    if a.bound is not None:
        grid = np.logspace(-4, 0, 200)
        ax.plot(
            grid,
            [max(dp_tpr_bound(float(x), a.bound.epsilon, a.bound.delta), 1e-4) for x in grid],
            linestyle="--",
            color="black",
            label=f"DP bound (epsilon {a.bound.epsilon:.2f})",
        )
    ax.plot([1e-4, 1], [1e-4, 1], linestyle=":", color="grey", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def page_blocks(site: SiteAudit) -> list[Block]:
    """The audit page's content: what was done, the numbers, the bound, the worst cases."""
    a = site.audit
    rows = [
        [ATTACK_NAMES[t.name], f"{t.auc:.3f}", _pct(t.tpr_at[0.01]), _pct(t.tpr_at[0.001])]
        for t in a.attacks
    ]
    if a.bound is not None:
        rows.append(
            [
                f"bound of (epsilon {a.bound.epsilon:.3g}, delta {a.bound.delta:.1g})-DP",
                f"{a.bound.auc:.3f}",
                _pct(a.bound.tpr_at[0.01]),
                _pct(a.bound.tpr_at[0.001]),
            ]
        )
    return [
        Heading(1, f"Membership-inference audit: {site.run_dir.name}"),
        Paragraph(
            f"The final model of run {site.run_dir.name} attacked with this site's own "
            f"records ({site.manifest}): {a.members} training rows (members) against "
            f"{a.non_members} held-out rows (non-members). An attack scores each record; "
            "AUC 0.5 and TPR equal to the FPR mean the attack cannot tell members from "
            "non-members. The TPR at a low FPR matters most: it says how many patients an "
            "attacker could identify while almost never being wrong (Carlini et al. 2022)."
        ),
        Paragraph(
            f"Loss threshold: a record is called a member when its loss under the model is "
            f"low. Likelihood ratio (offline LiRA): {a.settings.reference_models} reference "
            f"models retrain the model's trainable part on random halves of the site's "
            f"records ({a.settings.epochs} epochs each, on the cached frozen features); "
            "each record's confidence under the final model is compared with its confidence "
            "under the references that never saw it."
        ),
        Table(["attack", "AUC", "TPR at 1% FPR", "TPR at 0.1% FPR"], rows),
        Paragraph(
            f"Epsilon of the bound: {site.epsilon_source}. The bound holds for every attack, "
            "also stronger ones than these two: TPR <= min(e^epsilon FPR + delta, "
            "1 - e^-epsilon (1 - delta - FPR))."
        ),
        Image(
            "ROC curves (log scale) of both attacks and the DP bound", figure_png(_roc_figure(a))
        ),
        Heading(2, "Most exposed members (keep at the site)"),
        Paragraph(
            "The training records the likelihood-ratio attack singles out most, by manifest "
            "row. 'Identified' means above the threshold that flags 0.1% of non-members."
        ),
        Table(
            ["manifest row", "LiRA score", "loss", "identified at 0.1% FPR"],
            [
                [
                    str(w.row),
                    f"{w.score:.4f}",
                    f"{w.loss:.4f}",
                    "yes" if w.above_threshold else "no",
                ]
                for w in a.worst_cases
            ],
        ),
    ]


def write_page(site: SiteAudit, out: Path) -> Path:
    """Write the audit page (HTML, or Markdown for a .md path)."""
    blocks = page_blocks(site)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        to_markdown(blocks) if out.suffix == ".md" else to_html(blocks), encoding="utf-8"
    )
    return out
