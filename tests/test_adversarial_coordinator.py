"""A curious or compromised coordinator, which only sends messages and run settings: each attack,
and what the hospital does about it. Every test is written as the attack; it passes when the
attack fails (a refusal, a fixed-vocabulary error, an unchanged ledger, no hang).

The site is a deployed hospital (its own node config), driven through the real ClientApp with
the messages a coordinator would send.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from client.app import app
from common import protocol as R
from common.config import RunConfig
from common.errors import Kind, public_text
from common.model.fusion_model import build_model
from common.model.trainable import frozen_fingerprint, trainable_state
from common.privacy.accounting import epsilon_from_history
from common.privacy.audit import RESETS_FILE, audit
from common.privacy.ledger import LEDGER_FILE, load_ledger
from common.privacy.receipts import read_receipts
from tests.conftest import round_config, tiny_user_config
from tools.cli import main as fedfusion


class Coordinator:
    """A coordinator at one hospital: it chooses the run config, the messages and their order."""

    def __init__(
        self,
        site_dir: Path,
        state_dir: Path,
        policy: str | None = None,
        node: dict | None = None,
        **run: object,
    ) -> None:
        self.node_config = {
            "manifest": str(site_dir),
            "state-dir": str(state_dir),
            "site-name": "st-mary",
            "device": "cpu",
            **(node or {}),
        }
        if policy is not None:
            (state_dir.parent / "policy.toml").write_text(policy)
            self.node_config["policy"] = str(state_dir.parent / "policy.toml")
        self.state_dir = state_dir
        self.run_config = tiny_user_config(site_dir.parent, **run)
        model = build_model(RunConfig.from_user_config(self.run_config).model)
        self.fingerprint, self.parameters = frozen_fingerprint(model), trainable_state(model)

    def send(
        self,
        kind: str,
        server_round: int,
        *,
        run_key: str = "k",
        flower_run: int = 1,
        parameters: dict | None = None,
        **run: object,
    ) -> Message:
        """One message of Flower run `flower_run`, and the site's reply."""
        config = ConfigRecord(
            {**round_config(self.fingerprint, run_key), R.SERVER_ROUND: server_round}
        )
        content = RecordDict(
            {R.ARRAYS: ArrayRecord(parameters or self.parameters), R.CONFIG: config}
        )
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = flower_run, 0, 1
        msg = Message(content, dst_node_id=1, message_type=kind)
        context = Context(
            run_id=flower_run,
            node_id=1,
            node_config=dict(self.node_config),
            state=RecordDict(),
            run_config={**self.run_config, **{k.replace("_", "-"): v for k, v in run.items()}},
        )
        return app(msg, context)


def _site(demo_root: Path, tmp_path: Path, index: int = 0) -> Path:
    return Path(shutil.copytree(demo_root / f"hospital-{index}", tmp_path / "site"))


def _spent(state_dir: Path) -> float:
    receipts = [r for r in read_receipts(state_dir) if r.epsilon is not None]
    return epsilon_from_history(
        [(r.noise_multiplier, r.sample_rate, r.steps) for r in receipts],
        delta=receipts[0].delta,
        accountant=receipts[0].accountant,
    )


def test_new_run_keys_within_one_flower_run_cannot_exceed_the_cap(
    demo_root: Path, tmp_path: Path
) -> None:
    """Attack 1: each round under a new run key, to get a fresh per-run budget every time."""
    c = Coordinator(
        _site(demo_root, tmp_path),
        tmp_path / "state",
        'max-epsilon = 2.0\nmax-rounds = 2\nbudget-scope = "run"\n',
        num_server_rounds=4,
    )
    replies = [c.send(MessageType.TRAIN, r, run_key=f"key-{r}") for r in (1, 2, 3, 4)]
    assert not replies[0].has_error()
    for reply in replies[1:]:
        assert reply.error.code == R.ERROR_CODES[Kind.REFUSAL]
        assert reply.error.reason.endswith(public_text(Kind.REFUSAL, "run-key-conflict"))
    assert set(load_ledger(c.state_dir).runs) == {"key-1"}
    assert _spent(c.state_dir) <= 2.0 + 1e-6


def test_error_replies_carry_no_labels_rows_counts_or_paths(
    demo_root: Path, tmp_path: Path
) -> None:
    """Attack 2: class names that leave some rows unknown, to read labels out of the error."""
    c = Coordinator(_site(demo_root, tmp_path), tmp_path / "state", class_names="normal,pneumonia")
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = c.send(kind, 1)
        assert reply.error.code == R.ERROR_CODES[Kind.BAD_DATA]
        assert reply.error.reason == "site 'st-mary': " + public_text(
            Kind.BAD_DATA, "data-unusable"
        )
    assert not (c.state_dir / LEDGER_FILE).exists()


def test_evaluation_cannot_decode_a_single_records_label(demo_root: Path, tmp_path: Path) -> None:
    """Attack 3: a tiny validation fraction and a crafted head whose loss names the label."""
    c = Coordinator(_site(demo_root, tmp_path), tmp_path / "state", num_server_rounds=2)
    crafted = dict(c.parameters)
    crafted["head.weight"] = torch.zeros_like(crafted["head.weight"])
    crafted["head.bias"] = torch.tensor([0.0, 1.0, 2.0])
    reply = c.send(MessageType.EVALUATE, 1, parameters=crafted, val_fraction=1e-9)
    metrics = reply.content[R.METRICS]
    assert metrics[R.NUM_EXAMPLES] >= 20  # the site's own split, not the coordinator's fraction
    assert metrics[R.LOSS] == round(metrics[R.LOSS], 3)  # released at the stated precision
    again = c.send(MessageType.EVALUATE, 1, parameters=crafted)  # a second look at the round
    assert again.error.reason.endswith(public_text(Kind.REFUSAL, "evaluation-limit"))
    beyond = c.send(MessageType.EVALUATE, 3)  # a round the run never planned
    assert beyond.error.reason.endswith(public_text(Kind.CONFIGURATION, "message"))
    small = Coordinator(
        _site(demo_root, tmp_path / "small", 2),
        tmp_path / "small" / "state",
        "min-eval-records = 50\n",
    )
    assert small.send(MessageType.EVALUATE, 1).error.reason.endswith(
        public_text(Kind.REFUSAL, "too-few-records")
    )


def test_a_round_without_dp_never_erases_the_dp_history(demo_root: Path, tmp_path: Path) -> None:
    """Attack 4: a non-DP round in between, so later DP rounds would be planned from zero."""
    c = Coordinator(
        _site(demo_root, tmp_path),
        tmp_path / "state",
        'max-epsilon = 2.0\nrequire-dp = false\nbudget-scope = "run"\n',
        num_server_rounds=3,
    )
    assert not c.send(MessageType.TRAIN, 1, flower_run=1).has_error()
    assert not c.send(MessageType.TRAIN, 2, flower_run=2, dp=False).has_error()  # "a resume"
    assert not c.send(MessageType.TRAIN, 3, flower_run=3).has_error()
    entry = load_ledger(c.state_dir).run("k")
    assert entry.rounds == (1, 2, 3) and entry.unprotected_rounds == (2,)
    assert entry.account.steps == sum(r.steps for r in read_receipts(c.state_dir))
    assert _spent(c.state_dir) <= 2.0 + 1e-6  # the DP rounds compose under the cap


def _reexport(manifest: Path) -> None:
    """The same rows, written again: reversed, other column order, a blank line."""
    rows = list(csv.DictReader(manifest.open()))
    columns = list(reversed(list(rows[0])))
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(reversed(rows))
        fh.write("\n")


def test_a_re_exported_manifest_or_a_deleted_ledger_gives_no_fresh_budget(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attack 5: the same rows under a new manifest file; then the ledger deleted."""
    site = _site(demo_root, tmp_path)
    policy = 'max-epsilon = 2.0\nbudget-scope = "dataset"\n'
    c = Coordinator(site, tmp_path / "state", policy, num_server_rounds=1, target_epsilon=2.0)
    assert not c.send(MessageType.TRAIN, 1, run_key="first", flower_run=1).has_error()
    _reexport(site / "manifest.csv")
    second = c.send(MessageType.TRAIN, 1, run_key="second", flower_run=2)
    assert second.error.reason.endswith(public_text(Kind.REFUSAL, "budget-exhausted"))
    (c.state_dir / LEDGER_FILE).unlink()  # the receipts stay
    third = c.send(MessageType.TRAIN, 1, run_key="third", flower_run=3)
    assert third.error.reason.endswith(public_text(Kind.REFUSAL, "state-incomplete"))
    assert fedfusion(["privacy", "rebuild-ledger", str(c.state_dir), "--reason", "lost"]) == 0
    assert "rebuilt from the receipts" in capsys.readouterr().out
    assert json.loads((c.state_dir / RESETS_FILE).read_text())["reason"] == "lost"
    assert audit(c.state_dir).ok
    fourth = c.send(MessageType.TRAIN, 1, run_key="fourth", flower_run=4)
    assert fourth.error.reason.endswith(public_text(Kind.REFUSAL, "budget-exhausted"))


def test_without_a_policy_file_a_site_caps_epsilon_at_8(demo_root: Path, tmp_path: Path) -> None:
    """Attack 6: the largest epsilon the run config allows, at a site with no policy file."""
    c = Coordinator(
        _site(demo_root, tmp_path),
        tmp_path / "state",
        target_epsilon=100.0,
        target_delta=0.1,
        num_server_rounds=1,
    )
    reply = c.send(MessageType.TRAIN, 1)
    n = reply.content[R.METRICS][R.NUM_EXAMPLES]
    (receipt,) = read_receipts(c.state_dir)
    assert 7.0 < receipt.epsilon <= 8.0 + 1e-6 and receipt.budget_scope == "dataset"
    assert receipt.delta == pytest.approx(1 / (10 * n))  # not the coordinator's 0.1


@pytest.mark.parametrize("key", ["text-encoder", "image-weights"])
def test_model_paths_in_the_run_config_probe_nothing(
    demo_root: Path, tmp_path: Path, key: str
) -> None:
    """Attack 7: paths (present, absent) and an importable module as model sources."""
    c = Coordinator(_site(demo_root, tmp_path), tmp_path / "state")
    values = ["/etc/passwd", "/no/such/file", "pkg:os.path", str(tmp_path / "site")]
    reasons = {
        c.send(MessageType.TRAIN, 1, **{key.replace("-", "_"): v}).error.reason for v in values
    }
    assert reasons == {"site 'st-mary': " + public_text(Kind.CONFIGURATION, "model-source")}


def _sent_within(c: Coordinator, seconds: float, *sends: dict) -> list[Message]:
    """The site's replies to `sends` (kind, round, run settings), all in `seconds` (liveness)."""
    replies: list[Message] = []

    def attack() -> None:
        for send in sends:
            replies.append(c.send(**send))

    worker = threading.Thread(target=attack, daemon=True)
    worker.start()
    worker.join(seconds)  # liveness, not speed: a hang would hold the state folder's lock forever
    assert len(replies) == len(sends), f"the site is still working on attack {len(replies) + 1}"
    return replies


def test_noise_calibration_cannot_hang_the_site(demo_root: Path, tmp_path: Path) -> None:
    """Attack 8: the most rounds, epochs and smallest batches the run config allows, at a site
    whose own step bound would let them through (so calibration is what stops them)."""
    c = Coordinator(
        _site(demo_root, tmp_path),
        tmp_path / "state",
        node={"max-steps": 10**6},
        accountant="rdp",
        num_server_rounds=10_000,
        local_epochs=1000,
        batch_size=1,
        local_steps=0,
    )
    (reply,) = _sent_within(c, 120, {"kind": MessageType.TRAIN, "server_round": 1})
    assert reply.error.reason.endswith(public_text(Kind.REFUSAL, "accounting-limit"))
    assert not c.send(
        MessageType.TRAIN, 1, num_server_rounds=1, local_epochs=1, batch_size=64
    ).has_error()  # and the lock was released


def test_a_list_or_nan_in_any_run_config_key_is_a_configuration_refusal(
    demo_root: Path, tmp_path: Path
) -> None:
    """Attack 9: a list for each of the run config's keys, NaN and inf for each float key."""
    c = Coordinator(_site(demo_root, tmp_path), tmp_path / "state")
    refused = public_text(Kind.CONFIGURATION, "run-config")
    for key, value in c.run_config.items():
        wrong: list[object] = [[value, value]] + (
            [math.nan, math.inf] if isinstance(value, float) else []
        )
        for bad in wrong:
            reply = c.send(MessageType.TRAIN, 1, **{key: bad})
            assert reply.error.code == R.ERROR_CODES[Kind.CONFIGURATION], (key, bad, reply.error)
            assert reply.error.reason == f"site 'st-mary': {refused}", (key, bad)
    assert not c.state_dir.exists()  # refused before anything was read or written


def test_a_nan_or_huge_run_is_refused_and_the_next_honest_run_completes(
    demo_root: Path, tmp_path: Path
) -> None:
    """Attack 10: NaN settings, a 100,000-step round, 10^7 planned steps, each its own Flower run;
    then an honest run. (A NaN target once hung the noise search, and the site with it.) The PRV
    accountant's own bound: tests/test_privacy_accounting.py."""
    c = Coordinator(_site(demo_root, tmp_path), tmp_path / "state", num_server_rounds=1)
    train = {"kind": MessageType.TRAIN, "server_round": 1}
    attacks = [
        {"target_epsilon": math.nan},
        {"target_delta": math.nan},
        {"learning_rate": math.nan},
        {"local_steps": 100_000},
        {"num_server_rounds": 10_000, "local_steps": 1_000},
    ]
    replies = _sent_within(
        c,
        120,
        *(
            {**train, "flower_run": i, "run_key": f"attack-{i}", **a}
            for i, a in enumerate(attacks, 1)
        ),
    )
    reasons = [r.error.reason.removeprefix("site 'st-mary': ").split(":")[:2] for r in replies]
    assert reasons == [["configuration", " run-config"]] * 3 + [
        ["refused", " resource-limit"],
        ["refused", " accounting-limit"],
    ]
    honest = c.send(MessageType.TRAIN, 1, flower_run=99, run_key="honest")
    assert not honest.has_error(), honest.error
    assert set(load_ledger(c.state_dir).runs) == {"honest"}  # nothing charged to the attacks


def test_a_round_beyond_the_sites_resource_bounds_is_refused_uncharged(
    demo_root: Path, tmp_path: Path
) -> None:
    """Attack 11: valid but abusive settings (image size, steps, epochs x batches, a long round)."""
    site = _site(demo_root, tmp_path)
    bounds = {"max-image-size": 128, "max-steps": 50, "max-batch": 64}
    c = Coordinator(site, tmp_path / "state", node=bounds, num_server_rounds=2)
    limit = public_text(Kind.REFUSAL, "resource-limit")
    for kind, attack in (
        (MessageType.TRAIN, {"image_size": 1024}),
        (MessageType.EVALUATE, {"image_size": 1024}),
        (MessageType.TRAIN, {"local_steps": 51}),
        (MessageType.TRAIN, {"local_steps": 0, "local_epochs": 51}),
        (MessageType.TRAIN, {"local_steps": 0, "local_epochs": 30, "batch_size": 8}),
        (MessageType.TRAIN, {"batch_size": 65}),
    ):  # 30 x ceil(N / 8) steps
        assert c.send(kind, 1, **attack).error.reason.endswith(limit), attack
    assert not (c.state_dir / LEDGER_FILE).exists()
    slow = Coordinator(
        site, tmp_path / "state", node={**bounds, "max-round-seconds": 0.001}, num_server_rounds=2
    )
    assert slow.send(MessageType.TRAIN, 1, feature_cache=False).error.reason.endswith(limit)
    assert not (c.state_dir / LEDGER_FILE).exists() and not read_receipts(c.state_dir)
    assert not c.send(MessageType.TRAIN, 1).has_error()  # the site serves the next round


def test_a_changed_manifest_is_noticed_by_a_long_lived_site(
    demo_root: Path, tmp_path: Path
) -> None:
    """A label changed during a run: the same process notices (the version is recomputed)."""
    site = _site(demo_root, tmp_path)
    c = Coordinator(site, tmp_path / "state", num_server_rounds=2)
    assert not c.send(MessageType.TRAIN, 1).has_error()
    rows = list(csv.DictReader((site / "manifest.csv").open()))
    rows[0]["label"] = "effusion" if rows[0]["label"] != "effusion" else "normal"
    with (site / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    reply = c.send(MessageType.TRAIN, 2)
    assert reply.error.reason.endswith(public_text(Kind.REFUSAL, "data-changed"))
