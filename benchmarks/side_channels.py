"""Side channels around the accountant: what a curious coordinator reads of one record, and what
DP evaluation costs the coordinator's AUROC.

Three attacks of issue 24, each on a demo hospital under the default policy (a deployed site
without a policy file: epsilon 8 over its data, evaluation-share 0.1 of it), each decided by the
best decoder for what the site releases, over `trials` balanced trials (the target present in
half): the advantage is the decoder's accuracy above chance (0.5).
- **train-loss**: the issue's crafted head (its loss names each row's label), local-steps 1 and a
  batch over every row. The site's reply carries no training loss (nan), so every decoder is
  constant; measured on the real replies of the site with and without the target.
- **NaN canary**: a model whose logits overflow on the target alone. At the site's door such
  a model (above the parameter bound) is refused alike with and without the target; behind the
  door, DP-SGD (`common.privacy.dpsgd`, the site's noise and sampling rate) is run on the
  target's rows with and without it, and the decoder says "member" when the update is not finite.
- **evaluation**: the likelihood-ratio test of an attacker who knows every other validation row
  and the target's scores, on the counts released at the site's planned noise, over one query
  and over every evaluation of a 3-round run (the noise is fixed by the run's plan).

DP evaluation's cost: on medpix-dev (its 5 natural hospitals; a fifth of the patients held out
and evaluated at their hospitals as validation rows; the model of a 3-round federated DP run at
epsilon 8), the mean absolute error of the coordinator's pooled AUROC from the released counts
(`server.evaluation.pooled_metrics`) against the exact AUROC of the same rows, over `trials`
releases at each site's planned noise. Without medpix-dev: 5 demo hospitals. Each
`evaluation-share` in SHARES is measured; the default's is the headline.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.federation import Hospitals, site_states, test_probabilities
from benchmarks.record import Outcome
from benchmarks.small_hospitals import (
    DEMO_CLASSES,
    MEDPIX,
    MEDPIX_CLASSES,
    PooledFeatures,
    demo_cases,
    medpix_cases,
    split,
    write_site,
)
from benchmarks.workloads import bench_config, bench_user_config, demo_hospitals
from client.evaluation import evaluate_round
from client.rounds import RoundRequest, train_round
from client.site_config import SiteConfig
from client.state import SiteState
from common.config import RunConfig
from common.errors import FedFusionError
from common.model.trainable import trainable_state
from common.privacy.accounting import Account
from common.privacy.dpsgd import private_training
from common.privacy.enforcement import LocalPlan, negotiate, open_account
from common.privacy.ledger import load_ledger
from common.privacy.policy import SitePolicy
from common.privacy.release import release_counts
from common.training.ablation import ablation_scores, view_counts
from common.training.loop import FixedSteps
from common.training.score_counts import ScoreCounts, count_scores
from server.evaluation import SiteCounts, pooled_metrics

log = logging.getLogger(__name__)

SHARES = (0.1, 0.25, 0.5, 0.75)
# the evaluation attack decodes simulated releases (cheap): enough trials that the advantage is
# known to +-0.005 (one standard error), not +-0.035 as with 200
EVAL_TRIALS = 10_000
DEFAULT_SHARE = SitePolicy().evaluation_share


def run(
    quick: bool,
    work: Path,
    *,
    trials: int = 200,
    eval_trials: int = EVAL_TRIALS,
    medpix: Path = MEDPIX,
    preset: str = "demo",
    demo_scale: float = 0.5,
    shares: tuple[float, ...] = SHARES,
) -> Outcome:
    """The three attacks and DP evaluation's cost at each evaluation share in `shares` (the
    default's among them); the headline: the largest advantage."""
    if DEFAULT_SHARE not in shares:
        raise ValueError(f"shares {shares} must hold the default evaluation-share {DEFAULT_SHARE}")
    demo = demo_hospitals(work / "demo-data", 2, size_scale=0.3)
    advantages = {
        "train-loss": train_loss_attack(demo[0], work / "train-loss"),
        "nan-canary": nan_canary_attack(demo[0], work / "nan", trials),
        **evaluation_attack(demo[0], work / "evaluation", eval_trials),
    }
    cost = evaluation_cost(
        work / "cost",
        trials=trials if quick else 4 * trials,
        medpix=medpix,
        preset=preset,
        demo_scale=demo_scale,
        shares=shares,
    )
    headline = max(advantages["train-loss"], advantages["nan-canary"], advantages["evaluation-run"])
    mae = cost["shares"][str(DEFAULT_SHARE)]["mae"]
    print(table(advantages, cost), flush=True)
    return Outcome(
        key="side_channel_advantage",
        value=headline,
        target="<= 0.05",
        note=f"accuracy above chance of the best decoder, {trials} balanced trials each "
        f"({eval_trials} for the evaluation attack), default policy; the evaluation attack "
        "over every evaluation of a 3-round run "
        f"({advantages['evaluation-query']:.3f} for one query). DP evaluation's cost on "
        f"{cost['data']}: mean |pooled AUROC - exact| {mae:.3f} at evaluation-share "
        f"{DEFAULT_SHARE} (the default; chosen so the evaluation attack stays at chance + "
        "0.05 by the Gaussian mechanism's bound, not tuned on this data).",
        settings={
            "trials": trials,
            "eval_trials": eval_trials,
            "shares": list(shares),
            "default_share": DEFAULT_SHARE,
        },
        raw={"advantages": advantages, "cost": cost},
        extra={
            "eval_attack_advantage": (advantages["evaluation-run"], "<= 0.05"),
            "dp_eval_auroc_mae": (mae, "<= 0.03"),
        },
    )


def _site(folder: Path, state: Path) -> SiteState:
    """A deployed hospital with the default policy (no policy file)."""
    return SiteState(SiteConfig(site_name=folder.name, manifest=folder, state_dir=state))


def _without_first_row(folder: Path, to: Path) -> Path:
    """The same hospital without its first row (the target)."""
    to.mkdir(parents=True, exist_ok=True)
    lines = (folder / "manifest.csv").read_text().splitlines(keepends=True)
    shutil.copytree(folder / "images", to / "images", dirs_exist_ok=True)
    (to / "manifest.csv").write_text(lines[0] + "".join(lines[2:]))
    return to


def train_loss_attack(folder: Path, work: Path) -> float:
    """The issue's train-loss attack on the real replies of the site with and without the target."""
    run = bench_config(
        "tiny", class_names=DEMO_CLASSES, num_server_rounds=3, local_steps=1, batch_size=4096
    )
    released = {}
    for member, path in ((True, folder), (False, _without_first_row(folder, work / "without"))):
        site = _site(path, work / f"state-{member}")
        bundle = site.bundle(run.model)
        crafted = trainable_state(bundle.model)
        crafted["head.weight"] = torch.zeros_like(crafted["head.weight"])
        crafted["head.bias"] = torch.tensor([0.0, 3.0, 6.0])
        out = train_round(
            site,
            run,
            RoundRequest(
                server_round=1,
                run_key="attack",
                frozen_fingerprint=bundle.fingerprint,
                parameters=crafted,
                flower_run_id=1,
            ),
        )
        released[member] = out.train_loss
    log.info("train-loss released with and without the target: %s", released)
    if all(math.isnan(v) for v in released.values()):
        return 0.0  # any decoder is a function of the released value: here a constant
    # a released loss: the decoder, the target's label unit moves the mean loss
    return 0.5 if released[True] != released[False] else 0.0


def _net(scale: float) -> nn.Sequential:
    """Features -> logits whose weight on feature 0 (only the target's) overflows to inf."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 3, bias=False))
    with torch.no_grad():
        net[0].weight[:, 0] = scale
    return net


def nan_canary_attack(folder: Path, work: Path, trials: int) -> float:
    """The NaN canary behind the site's door, at the site's own noise and sampling rate."""
    run = bench_config("tiny", class_names=DEMO_CLASSES, num_server_rounds=3)
    site = _site(folder, work / "state")
    rows = len(site.data(run).train)
    terms = negotiate(
        SitePolicy(),
        run,
        dp=True,
        target_epsilon=8.0,
        target_delta=1e-5,
        num_rounds=3,
        num_examples=rows,
    )
    plan = LocalPlan(
        num_examples=rows,
        batch_size=run.train.batch_size,
        epochs=1,
        steps_per_round=run.train.local_steps,
    )
    account = open_account(terms, [], plan)
    generator = torch.Generator().manual_seed(3)
    others = torch.randn(rows - 1, 8, generator=generator)
    others[:, 0] = 0.0
    target = torch.randn(1, 8, generator=generator)
    target[0, 0] = 10.0
    right = 0
    for t in range(trials):
        member = t % 2 == 0
        x = torch.cat([others, target]) if member else others
        y = torch.randint(0, 3, (len(x),), generator=generator)
        finite = _dp_update_is_finite(
            x, y, account, batch_size=run.train.batch_size, steps=run.train.local_steps
        )
        right += (not finite) == member  # the decoder: a NaN update means "sampled"
    return right / trials - 0.5


def _dp_update_is_finite(
    x: torch.Tensor, y: torch.Tensor, account: Account, *, batch_size: int, steps: int
) -> bool:
    net = _net(3e38)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    account = replace(account, sample_rate=1 / len(loader))
    torch.seed()
    with private_training(
        net, optimizer, loader, account, max_grad_norm=1.0, grad_sample_mode="hooks"
    ) as session:
        for xb, yb in FixedSteps(session.loader, steps):
            session.optimizer.zero_grad()
            session.criterion(net(xb), yb).backward()
            session.optimizer.step()
    return bool(all(torch.isfinite(p).all() for p in net.parameters()))


def evaluation_attack(folder: Path, work: Path, trials: int) -> dict[str, float]:
    """The likelihood-ratio attack on released counts: one query, and every query of the run."""
    run = bench_config("tiny", class_names=DEMO_CLASSES, num_server_rounds=3)
    site = _site(folder, work / "state")
    bundle, data = site.bundle(run.model), site.data(run)
    request = RoundRequest(
        server_round=1,
        run_key="attack",
        frozen_fingerprint=bundle.fingerprint,
        parameters=trainable_state(bundle.model),
        flower_run_id=1,
    )
    evaluate_round(site, run, request)  # the site plans the run's noise, as for any coordinator
    sigma = load_ledger(site.site.state_dir).run("attack").account.release_noise_multiplier
    scores = ablation_scores(bundle.model, DataLoader(data.val, batch_size=64), torch.device("cpu"))
    present = view_counts(scores, 3, ablation=False)
    row = int(np.flatnonzero(scores.both.numpy())[0])
    probs = torch.softmax(scores.logits["both"][row : row + 1], dim=-1).numpy()
    one = count_scores(probs, scores.labels[row : row + 1].numpy(), 3)
    absent = {**present, "both": present["both"] + ScoreCounts(-one.scores, -one.confusion)}
    delta = _flat(present) - _flat(absent)
    out = {}
    for name, queries in (("evaluation-query", 1), ("evaluation-run", 3)):
        right = 0
        for t in range(trials):
            member = t % 2 == 0
            statistic = 0.0
            for _ in range(queries):
                noisy = release_counts(
                    present if member else absent, noise_multiplier=sigma, views_per_row=1
                )
                statistic += float((_flat(noisy.views) - _flat(absent)) @ delta - delta @ delta / 2)
            right += (statistic > 0) == member
        out[name] = right / trials - 0.5
    out["evaluation-noise-multiplier"] = sigma
    return out


def _flat(views: dict[str, ScoreCounts]) -> np.ndarray:
    return np.concatenate(
        [a.ravel() for _, c in sorted(views.items()) for a in c.arrays().values()]
    )


def evaluation_cost(
    work: Path,
    *,
    trials: int,
    medpix: Path = MEDPIX,
    preset: str = "demo",
    demo_scale: float = 0.5,
    shares: tuple[float, ...] = SHARES,
) -> dict[str, Any]:
    """Mean |pooled AUROC from released counts - exact AUROC| at each evaluation share."""
    found = medpix.is_file()
    if not found:
        print(
            f"side_channels: medpix-dev not found at {medpix}: DP evaluation's cost is measured "
            "on 5 demo hospitals",
            flush=True,
        )
    classes = MEDPIX_CLASSES if found else DEMO_CLASSES
    cases = medpix_cases(medpix) if found else demo_cases(work / "demo-data", demo_scale)
    user_config = bench_user_config(preset, class_names=classes, dp=True, target_epsilon=8.0)
    run = RunConfig.from_user_config(user_config)
    s = split(cases, work / "split", seed=0)
    pool = site_states(work / "state" / "pool", [write_site(work / "pool", cases)])[0]
    features = PooledFeatures(pool, run)
    hospitals = Hospitals(work / "federation")
    test_site = site_states(work / "state", [s.test])[0]
    for p in s.hospitals:
        site_run, site = hospitals.warm(p, user_config)
        features.prime(site, site_run)
    features.prime(test_site, run, split_name="test")
    state = hospitals.federate(user_config, s.hospitals, "cost")
    probs, labels = test_probabilities(run, test_site, state)
    hospital_of = {c.key: c.hospital for c in cases}
    rows = test_site.data(run).train.rows
    by_site: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_site[
            hospital_of[(str(Path(r.image).resolve()) if r.image else "", r.text, r.patient_id)]
        ].append(i)
    num_classes = len(run.model.class_names)
    exact = _auroc(labels, probs)
    counts = {h: count_scores(probs[i], labels[i], num_classes) for h, i in by_site.items()}
    train_sizes = {key.split(" (", 1)[1][:-1]: rows for key, rows in s.sizes.items()}
    result: dict[str, Any] = {
        "data": "medpix-dev" if found else "5 demo hospitals",
        "exact_auroc": exact,
        "validation_rows": {h: len(i) for h, i in by_site.items()},
        "shares": {},
    }
    for share in shares:
        sigmas = {h: _planned_noise(run, share, train_sizes[h]) for h in by_site}
        errors = []
        for _ in range(trials):
            released = [
                SiteCounts(
                    records=len(by_site[h]),
                    metrics={},
                    counts=release_counts(
                        {"lacking": ScoreCounts.empty(num_classes), "both": c},
                        noise_multiplier=sigmas[h],
                        views_per_row=1,
                    ).views,
                )
                for h, c in counts.items()
            ]
            errors.append(abs(pooled_metrics(released)["auroc"] - exact))
        result["shares"][str(share)] = {
            "mae": float(np.mean(errors)),
            "noise_multiplier": float(np.mean(list(sigmas.values()))),
        }
        log.info("evaluation-share %g: MAE %.4f", share, np.mean(errors))
    return result


def _planned_noise(run: RunConfig, share: float, rows: int) -> float:
    """The release noise a site of `rows` training rows plans at `share` (default policy else)."""
    policy = SitePolicy(evaluation_share=share)
    terms = negotiate(
        policy,
        run,
        dp=True,
        target_epsilon=run.privacy.target_epsilon,
        target_delta=run.privacy.target_delta,
        num_rounds=run.federation.num_server_rounds,
        num_examples=rows,
    )
    try:
        plan = LocalPlan(
            num_examples=rows,
            batch_size=run.train.batch_size,
            epochs=run.train.local_epochs,
            steps_per_round=run.train.local_steps,
        )
        return open_account(terms, [], plan).release_noise_multiplier
    except FedFusionError as err:
        raise RuntimeError(f"a site of {rows} rows cannot plan its run: {err.detail}") from err


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def table(advantages: dict[str, float], cost: dict[str, Any]) -> str:
    """The attacks' advantages and DP evaluation's cost per share."""
    lines = ["attack (default policy)             accuracy above chance"]
    for name in ("train-loss", "nan-canary", "evaluation-query", "evaluation-run"):
        lines.append(f"  {name:<34}{advantages[name]:+.3f}")
    lines.append(f"DP evaluation on {cost['data']} (exact pooled AUROC {cost['exact_auroc']:.3f})")
    lines.append("  evaluation-share  noise multiplier  mean |AUROC error|")
    for share, v in cost["shares"].items():
        lines.append(f"  {share:<16}  {v['noise_multiplier']:>16.2f}  {v['mae']:>18.4f}")
    return "\n".join(lines)
