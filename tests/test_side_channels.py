"""Side channels around the accountant (issue 24), each written as a curious coordinator's attack.

A coordinator chooses the model a site computes on and reads everything the site replies. Each
test runs the attack and passes when it fails: what it reads is either nothing, or a release
charged to the site's account whose noise keeps the attacker near chance, and the composed
epsilon over the site's receipts stays within its cap.

"Advantage" here is the attacker's accuracy above chance (0.5) in a balanced membership game.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from scipy.stats import norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.evaluation import evaluate_round
from client.state import SiteState
from common import protocol as R
from common.errors import Kind, public_text
from common.privacy import release as release_module
from common.privacy.accounting import Account, epsilon_from_history
from common.privacy.audit import audit
from common.privacy.dpsgd import private_training
from common.privacy.ledger import load_ledger
from common.privacy.receipts import read_receipts
from common.privacy.release import LOSS_CLIP, release_counts, release_mean_loss
from common.training.ablation import ablation_scores, view_counts
from tests.conftest import hospital, request, tiny_run
from tests.test_adversarial_coordinator import Coordinator, _site

README = Path(__file__).resolve().parent.parent / "README.md"


def _composed(state_dir: Path) -> float:
    """Epsilon of every charge the site's receipts record, composed (its whole spend)."""
    receipts = [r for r in read_receipts(state_dir) if r.epsilon is not None]
    return epsilon_from_history(
        [(r.noise_multiplier, r.sample_rate, r.steps) for r in receipts],
        delta=receipts[0].delta,
        accountant=receipts[0].accountant,
    )


def _loss_unit_head(c: Coordinator) -> dict[str, torch.Tensor]:
    """The issue's crafted model: a head whose loss on each row carries that row's label."""
    crafted = dict(c.parameters)
    crafted["head.weight"] = torch.zeros_like(crafted["head.weight"])
    crafted["head.bias"] = torch.tensor([0.0, 3.0, 6.0])
    return crafted


def test_the_exact_train_loss_never_leaves_a_site(demo_root: Path, tmp_path: Path) -> None:
    """Attack 1: one step on every row (batch >= rows) under a head whose loss names the labels."""
    c = Coordinator(
        _site(demo_root, tmp_path),
        tmp_path / "state",
        num_server_rounds=3,
        local_steps=1,
        batch_size=512,
    )
    for server_round in (1, 2, 3):
        reply = c.send(MessageType.TRAIN, server_round, parameters=_loss_unit_head(c))
        assert not reply.has_error(), reply.error
        assert math.isnan(reply.content[R.METRICS][R.TRAIN_LOSS])  # nothing to decode
    assert _composed(c.state_dir) <= 8.0 * (1 + 1e-6)


def test_a_shared_train_loss_is_noisy_and_charged(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack 1 at a site whose policy shares the training loss: it is a charged release."""
    c = Coordinator(
        _site(demo_root, tmp_path),
        tmp_path / "state",
        "share-train-loss = true\nmax-epsilon = 4.0\n",
        num_server_rounds=2,
        local_steps=1,
        batch_size=512,
    )
    losses = [
        c.send(MessageType.TRAIN, r, parameters=_loss_unit_head(c)).content[R.METRICS][R.TRAIN_LOSS]
        for r in (1, 2)
    ]
    assert all(math.isfinite(v) for v in losses)
    kinds = [(r.round, r.kind) for r in read_receipts(c.state_dir)]
    assert kinds == [(1, "train"), (1, "train-loss"), (2, "train"), (2, "train-loss")]
    assert audit(c.state_dir).ok and _composed(c.state_dir) <= 4.0 * (1 + 1e-6)
    # the best decoder on one release: a target's clipped loss is 0 or LOSS_CLIP, all else known
    sigma = load_ledger(c.state_dir).run("k").account.release_noise_multiplier
    rng = np.random.default_rng(1)
    others = rng.uniform(0, 1, 99)
    trials = 2000
    right = 0
    generator = np.random.Generator(np.random.PCG64(11))
    monkeypatch.setattr(release_module.np.random, "default_rng", lambda: generator)
    for t in range(trials):
        member = t % 2 == 0
        target = LOSS_CLIP if member else 0.0
        released = release_mean_loss(np.append(others, target), noise_multiplier=sigma) * 100
        right += (released - others.sum() > LOSS_CLIP / 2) == member
    assert right / trials - 0.5 <= 0.05


def _net(overflow_at: str) -> nn.Sequential:
    """Two bias-free layers (a row of zeros has a zero gradient: the reference for "nothing")
    with a weight that fires on feature 0, which only the target has: its logits, or its hidden
    activations, overflow to inf."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    with torch.no_grad():
        if overflow_at == "logits":
            net[0].weight.copy_(torch.eye(8, 4))  # feature 0 reaches the output layer as it is
            net[2].weight[:, 0] = 3e38
        else:
            net[0].weight[:, 0] = 3e38
    return net


def _one_dp_step(
    rows: torch.Tensor, labels: torch.Tensor, mode: str, overflow_at: str
) -> dict[str, torch.Tensor]:
    net = _net(overflow_at)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(rows, labels), batch_size=len(rows))
    account = Account(accountant="rdp", delta=1e-5, noise_multiplier=0.0, sample_rate=1.0)
    with private_training(
        net, optimizer, loader, account, max_grad_norm=1.0, grad_sample_mode=mode
    ) as session:
        for x, y in session.loader:  # sampling rate 1: every row, every time
            session.optimizer.zero_grad()
            session.criterion(net(x), y).backward()
            session.optimizer.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    ("mode", "overflow_at"), [("hooks", "logits"), ("hooks", "hidden"), ("ghost", "logits")]
)
def test_a_row_that_overflows_contributes_exactly_nothing(mode: str, overflow_at: str) -> None:
    """Attack 2, at the mechanism: a model that overflows on the target alone (a NaN canary).

    The update with the target equals the update with a row of zeros in its place (no
    gradient), so it is finite and tells nothing of the target. (Ghost clipping sums the
    batch's gradients in one backward pass, so an overflow inside the network, not at the
    logits, is kept out by the parameter bound at the site's door: the next test.)
    """
    torch.manual_seed(1)
    others = torch.randn(6, 4)
    others[:, 0] = 0.0
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    target = torch.tensor([[10.0, 1.0, -1.0, 0.5]])
    with_target = _one_dp_step(torch.cat([others, target]), labels, mode, overflow_at)
    with_nothing = _one_dp_step(torch.cat([others, torch.zeros(1, 4)]), labels, mode, overflow_at)
    for name, value in with_target.items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, with_nothing[name], rtol=0, atol=0)


def test_a_model_that_could_overflow_is_refused_before_any_row_is_read(
    demo_root: Path, tmp_path: Path
) -> None:
    """Attack 2, at the site: the canary head is refused alike whatever the site holds."""
    reasons = set()
    for index in (0, 1):
        c = Coordinator(_site(demo_root, tmp_path / str(index), index), tmp_path / f"s{index}")
        crafted = dict(c.parameters)
        crafted["head.weight"] = crafted["head.weight"].clone()
        crafted["head.weight"][0, 0] = 1e30
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            reasons.add(c.send(kind, 1, parameters=crafted).error.reason)
        assert not read_receipts(c.state_dir)  # nothing charged
    assert reasons == {"site 'st-mary': " + public_text(Kind.CONFIGURATION, "message")}


def test_an_evaluation_is_a_noisy_release_charged_like_training(
    demo_root: Path, tmp_path: Path
) -> None:
    """Attack 3: exact metrics of a crafted model, then evaluations after the budget is spent."""
    policy = 'max-epsilon = 2.0\nbudget-scope = "dataset"\n'
    c = Coordinator(
        _site(demo_root, tmp_path),
        tmp_path / "state",
        policy,
        num_server_rounds=2,
        target_epsilon=2.0,
    )
    for r in (1, 2):
        assert not c.send(MessageType.TRAIN, r, run_key="first", flower_run=1).has_error()
        reply = c.send(
            MessageType.EVALUATE, r, run_key="first", flower_run=1, parameters=_loss_unit_head(c)
        )
        assert reply.content[R.METRICS][R.COUNT_NOISE] > 1.0  # the noise on every count
    assert [r.kind for r in read_receipts(c.state_dir)] == ["train", "evaluate"] * 2
    assert load_ledger(c.state_dir).run("first").evaluated == (1, 2)
    assert audit(c.state_dir).ok and _composed(c.state_dir) <= 2.0 * (1 + 1e-6)
    # the budget is spent: a new run of 100 rounds gets no evaluation at all
    again = c.send(MessageType.EVALUATE, 1, run_key="second", flower_run=2, num_server_rounds=100)
    assert again.error.reason.endswith(public_text(Kind.REFUSAL, "budget-exhausted"))
    assert _composed(c.state_dir) <= 2.0 * (1 + 1e-6)


@pytest.mark.slow
def test_the_evaluation_noise_grows_with_the_evaluations_a_run_plans(
    demo_root: Path, tmp_path: Path
) -> None:
    """A run that plans 10,000 rounds gets 10,000 releases' worth of noise on each."""
    noise = {}
    for rounds in (3, 10_000):
        c = Coordinator(
            _site(demo_root, tmp_path / str(rounds)),
            tmp_path / f"s{rounds}",
            accountant="rdp",
            num_server_rounds=rounds,
            local_steps=1,
        )
        noise[rounds] = c.send(MessageType.EVALUATE, 1).content[R.METRICS][R.COUNT_NOISE]
    assert noise[10_000] > 30 * noise[3]


def test_the_best_attack_on_one_evaluation_is_near_chance(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack 3, optimally: an attacker who knows every other validation row and the target's
    scores decides from one release whether the target is there (a likelihood-ratio test on
    the counts it changes). Default policy, the run's noise as the site planned it."""
    run = tiny_run(demo_root, num_server_rounds=3)
    state = SiteState(hospital(demo_root, tmp_path / "state", 0))
    evaluate_round(state, run, request(state, run, 1))
    sigma = load_ledger(state.site.state_dir).run("run-1").account.release_noise_multiplier
    bundle, data = state.bundle(run.model), state.data(run)
    scores = ablation_scores(bundle.model, DataLoader(data.val, batch_size=64), torch.device("cpu"))
    present = view_counts(scores, 3, ablation=False)
    absent = {**present, "both": present["both"] + _one_row_less(present["both"], scores)}
    generator = np.random.Generator(np.random.PCG64(5))
    monkeypatch.setattr(release_module.np.random, "default_rng", lambda: generator)
    trials, right = 4000, 0
    delta = _flat(present) - _flat(absent)  # what the target adds
    for t in range(trials):
        member = t % 2 == 0
        noisy = release_counts(
            present if member else absent, noise_multiplier=sigma, views_per_row=1
        )
        observed = _flat(noisy.views) - _flat(absent)
        right += (observed @ delta > delta @ delta / 2) == member
    advantage = right / trials - 0.5
    expected = norm.cdf(np.linalg.norm(delta) / (2 * noisy.noise_std)) - 0.5
    assert advantage <= expected + 3 * 0.5 / math.sqrt(trials)
    assert advantage <= 0.05


def _flat(views: dict) -> np.ndarray:
    return np.concatenate(
        [np.concatenate([a.ravel() for a in c.arrays().values()]) for _, c in sorted(views.items())]
    )


def _one_row_less(counts, scores):
    """Counts change when the first row with both modalities leaves (its own counts, negated)."""
    from common.training.score_counts import count_scores, finite_probabilities

    row = int(np.flatnonzero(scores.both.numpy())[0])
    probs = finite_probabilities(scores.logits["both"][row : row + 1].numpy())
    one = count_scores(probs, scores.labels[row : row + 1].numpy(), 3)
    return type(one)(-one.scores, -one.confusion)


def _add_a_patient(site: Path) -> None:
    """A new patient's row: a new image (other bytes), a new report."""
    manifest = site / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    first = rows[0]
    image = site / "images" / "new-patient.png"
    shutil.copy(site / first["image"], image)
    with image.open("ab") as fh:
        fh.write(b"\0")  # other bytes, still a readable PNG
    rows.append(
        {
            **first,
            "image": "images/new-patient.png",
            "patient_id": "new-patient",
            "text": first["text"] + " new patient.",
        }
    )
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(first))
        writer.writeheader()
        writer.writerows(rows)


def test_one_added_row_does_not_reset_the_dataset_budget(demo_root: Path, tmp_path: Path) -> None:
    """Attack 4: a run spends the dataset's budget; one patient is added; a new run starts."""
    site = _site(demo_root, tmp_path)
    policy = 'max-epsilon = 2.0\nbudget-scope = "dataset"\nmin-eval-records = 1\n'
    c = Coordinator(site, tmp_path / "state", policy, num_server_rounds=1, target_epsilon=2.0)
    assert not c.send(MessageType.TRAIN, 1, run_key="first", flower_run=1).has_error()
    _add_a_patient(site)
    second = c.send(MessageType.TRAIN, 1, run_key="second", flower_run=2)
    assert second.error.reason.endswith(public_text(Kind.REFUSAL, "budget-exhausted"))
    third = c.send(MessageType.EVALUATE, 1, run_key="third", flower_run=3)
    assert third.error.reason.endswith(public_text(Kind.REFUSAL, "budget-exhausted"))
    assert _composed(c.state_dir) <= 2.0 * (1 + 1e-6) and audit(c.state_dir).ok


@pytest.mark.slow
def test_a_dataset_with_no_record_in_common_has_its_own_budget(
    demo_root: Path, tmp_path: Path
) -> None:
    """The other side of attack 4: another hospital's rows share nothing, so nothing composes."""
    site = _site(demo_root, tmp_path)
    policy = 'max-epsilon = 2.0\nbudget-scope = "dataset"\n'
    c = Coordinator(site, tmp_path / "state", policy, num_server_rounds=1, target_epsilon=2.0)
    assert not c.send(MessageType.TRAIN, 1, run_key="first", flower_run=1).has_error()
    shutil.rmtree(site)
    shutil.copytree(demo_root / "hospital-1", site)
    assert not c.send(MessageType.TRAIN, 1, run_key="second", flower_run=2).has_error()


def _without_label(site: Path, label: str) -> None:
    manifest = site / "manifest.csv"
    rows = [r for r in csv.DictReader(manifest.open()) if r["label"] != label]
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_label_probe_reads_nothing_beyond_the_published_labels(
    demo_root: Path, tmp_path: Path
) -> None:
    """Attack 5: class names without one label, at a site that holds it and one that does not."""
    policy = 'labels = ["normal", "pneumonia", "effusion"]\n'
    replies = {}
    for holds in (True, False):
        site = _site(demo_root, tmp_path / str(holds))
        if not holds:
            _without_label(site, "effusion")
        c = Coordinator(site, tmp_path / f"state-{holds}", policy)
        replies[holds] = {
            kind: c.send(kind, 1, class_names="normal,pneumonia").error
            for kind in (MessageType.TRAIN, MessageType.EVALUATE)
        }
        assert not read_receipts(c.state_dir)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        assert (replies[True][kind].code, replies[True][kind].reason) == (
            replies[False][kind].code,
            replies[False][kind].reason,
        )
        assert replies[True][kind].reason.endswith(public_text(Kind.REFUSAL, "labels-not-covered"))


def test_every_reply_key_has_a_documented_release_status(demo_root: Path, tmp_path: Path) -> None:
    """A reply key added without saying what protects it fails here (and in README "Privacy")."""
    c = Coordinator(
        _site(demo_root, tmp_path),
        tmp_path / "state",
        "share-train-loss = true\n",
        num_server_rounds=1,
    )
    keys = set()
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        content = c.send(kind, 1).content
        for name, record in content.items():
            if name in (R.ARRAYS, R.COUNTS):  # arrays: named by the model and the counts' views
                keys.add(name)
            else:
                keys |= {f"{name}/{item}" for item in record}
    assert keys <= set(R.RELEASES), sorted(keys - set(R.RELEASES))
    assert set(R.RELEASES.values()) <= {"dp", "public"}
    privacy = README.read_text().split("## Privacy", 1)[1].split("\n## ", 1)[0]
    missing = [k for k in R.RELEASES if f"`{k.split('/')[-1]}`" not in privacy]
    assert not missing, f"README 'Privacy' does not list {missing}"
