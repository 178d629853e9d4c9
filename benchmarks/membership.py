"""Membership inference: what a site's training rows leak through the final model, with DP at
epsilon 8 and without DP, measured by the site's own audit (`fedfusion privacy audit`).

One hospital trains through its own round (`client.rounds.train_round`: feature cache, DP-SGD,
ledger) for many rounds of many local epochs, long enough that the model overfits without DP;
then the audit (`common.privacy.membership`) attacks the final model with the site's training
rows as members and its held-out patients' rows as non-members: loss threshold and offline
likelihood ratio (reference models retrained on the site's frozen features). Two data sets:
a demo hospital and, when present, a medpix-dev hospital (`../shared/data/medpix-dev`: real CT
and MR images with their case reports, one image per patient so that a record is a patient);
without it the benchmark says so and uses the demo hospital only.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from benchmarks.record import Outcome
from benchmarks.workloads import bench_config, demo_hospitals
from client.rounds import RoundRequest, train_round
from client.site_config import SiteConfig
from client.state import SiteState
from common.config import RunConfig
from common.data.manifest import read_manifest
from common.model.trainable import load_trainable_state, trainable_state
from common.privacy.membership import AuditSettings, MembershipAudit, membership_audit
from common.training.loop import pick_device

log = logging.getLogger(__name__)

MEDPIX = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "medpix-dev"
MEDPIX_CLASSES = "other,neoplasm"


def medpix_site(
    folder: Path, source: Path = MEDPIX, region: str | None = None, one_per_patient: bool = True
) -> Path | None:
    """A hospital of medpix-dev's rows (a manifest beside the data's own), if the data is present.

    `region`: only that body region's cases (None: all). `one_per_patient`: each case's first
    image only, so a record is a patient and record-level DP is patient-level DP (a case has up
    to 16 images with one report: with all of them a patient is protected at about k x epsilon).
    """
    manifest = source / "manifest.csv"
    if not manifest.is_file():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with manifest.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if region is None or r.get("site") == region]
    if one_per_patient:
        rows = list({r["patient_id"]: r for r in reversed(rows)}.values())[::-1]
    with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "text", "label", "patient_id"])
        for r in rows:
            writer.writerow(
                [
                    os.path.relpath(source / r["image"], folder),
                    r["text"],
                    r["label"],
                    r["patient_id"],
                ]
            )
    return folder


def train_site(run: RunConfig, site: SiteState, run_key: str) -> dict:
    """Every round of `run` at one site (its own round: DP as `run` says); the final state."""
    bundle = site.bundle(run.model)
    state = trainable_state(bundle.model)
    for r in range(1, run.federation.num_server_rounds + 1):
        out = train_round(
            site,
            run,
            RoundRequest(
                server_round=r,
                run_key=run_key,
                frozen_fingerprint=bundle.fingerprint,
                parameters=state,
            ),
        )
        state = {**state, **out.state}
    return state


def audit_site(
    run: RunConfig,
    site: SiteState,
    state: dict,
    *,
    references: int,
    epsilon: float | None,
    delta: float | None,
) -> MembershipAudit:
    """The site's audit of the model with `state`: its training rows against its held-out rows."""
    bundle, data = site.bundle(run.model), site.data(run)
    load_trainable_state(bundle.model, state)
    t = run.train
    settings = AuditSettings(
        reference_models=references,
        epochs=run.federation.num_server_rounds * t.local_epochs,
        learning_rate=t.learning_rate,
        batch_size=t.batch_size,
    )
    return membership_audit(
        bundle.model,
        data.train,
        data.val,
        member_rows=[r.line for r in data.train.rows],
        settings=settings,
        epsilon=epsilon,
        delta=delta,
        device=pick_device("cpu"),
    )


def measure(
    work: Path,
    folder: Path,
    *,
    preset: str,
    rounds: int,
    local_epochs: int,
    references: int,
    settings: tuple[str, ...] = ("nodp", "dp8"),
    **overrides: object,
) -> dict[str, dict[str, float]]:
    """Train without DP (`nodp`) and with DP at epsilon 8 (`dp8`) at the hospital in `folder`;
    audit each."""
    work.mkdir(parents=True, exist_ok=True)
    policy = work / "policy.toml"
    policy.write_text("require-dp = false\nmin-eval-records = 1\n")
    results = {}
    for name in settings:
        dp = name == "dp8"
        run = bench_config(
            preset,
            num_server_rounds=rounds,
            local_epochs=local_epochs,
            dp=dp,
            target_epsilon=8.0,
            **overrides,
        )
        site = SiteState(
            SiteConfig(
                site_name=folder.name,
                manifest=folder,
                policy=policy,
                state_dir=work / "state" / f"{folder.name}-{name}",
            )
        )
        state = train_site(run, site, f"mia-{name}")
        data = site.data(run)
        delta = 1.0 / (10 * len(data.train))  # the default policy's delta for this site
        audit = audit_site(
            run,
            site,
            state,
            references=references,
            epsilon=8.0 if dp else None,
            delta=delta if dp else None,
        )
        loss, lira = audit.attack("loss"), audit.attack("lira")
        results[name] = {
            "members": audit.members,
            "non_members": audit.non_members,
            "auc_loss": loss.auc,
            "auc_lira": lira.auc,
            "auc": max(loss.auc, lira.auc),
            "tpr_at_1pct_fpr": max(loss.tpr_at[0.01], lira.tpr_at[0.01]),
            "tpr_at_0.1pct_fpr": max(loss.tpr_at[0.001], lira.tpr_at[0.001]),
            "identified_members_at_0.1pct_fpr": sum(w.above_threshold for w in audit.worst_cases),
        }
        log.info("%s %s: %s", folder.name, name, results[name])
    return results


def run(quick: bool, work: Path) -> Outcome:
    """Both settings on a demo hospital and (if present) a medpix-dev hospital."""
    rounds, epochs, references = (4, 5, 4) if quick else (10, 10, 8)
    demo = demo_hospitals(work / "demo", 3, size_scale=0.5 if quick else 1.0)[0]
    data = {"demo": (demo, {})}
    medpix = medpix_site(work / "medpix")
    if medpix is None:
        print(f"membership: {MEDPIX} is absent; measuring the demo hospital only.")
    else:
        data["medpix-dev"] = (medpix, {"class_names": MEDPIX_CLASSES})
    results = {
        name: measure(
            work / name,
            folder,
            preset="demo",
            rounds=rounds,
            local_epochs=epochs,
            references=references,
            **overrides,
        )
        for name, (folder, overrides) in data.items()
    }
    # the headline: the worst (highest) AUC over the data sets, the worst TPR at 1% FPR
    dp8 = max(r["dp8"]["auc"] for r in results.values())
    nodp = max(r["nodp"]["auc"] for r in results.values())
    tpr = max(r["dp8"]["tpr_at_1pct_fpr"] for r in results.values())
    tpr_nodp = max(r["nodp"]["tpr_at_1pct_fpr"] for r in results.values())
    rows = {
        name: len(
            read_manifest(
                folder, tuple((o.get("class_names") or "normal,pneumonia,effusion").split(","))
            )[1]
        )
        for name, (folder, o) in data.items()
    }
    return Outcome(
        key="mia_auc_dp8",
        value=dp8,
        target="<= 0.55",
        note="membership-inference AUC (the stronger of loss threshold and offline LiRA, the "
        "worse data set) against one hospital's final model trained with DP at epsilon 8; "
        "nodp: the same training without DP (long enough to overfit); TPR at 1% FPR beside",
        settings={
            "preset": "demo",
            "rounds": rounds,
            "local_epochs": epochs,
            "reference_models": references,
            "datasets": sorted(data),
            "rows": rows,
            "medpix": "every region, one image per patient" if medpix else None,
        },
        raw=results,
        extra={
            "mia_auc_nodp": (nodp, ">= 0.5"),
            "mia_tpr_at_1pct_fpr_dp8": (tpr, "<= 0.03"),
            "mia_tpr_at_1pct_fpr_nodp": (tpr_nodp, ">= 0.0"),
        },
    )
