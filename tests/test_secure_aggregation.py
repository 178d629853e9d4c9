"""Secure aggregation in the round loop: the real ServerApp and ClientApp, in process.

The honest federation first (each round one noisy DP-SGD step whose clipped sums the coordinator
sees only in sum, each site charged at the sum's noise multiplier, its receipt holding the
fallback guarantee); then a coordinator's attacks on a site's ClientApp, each written as the
attack: the site answers nothing that would unmask it beyond its policy.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.rounds import train_round
from client.secure import SecureTerms, offer_keys
from client.state import SiteState
from common import protocol as R
from common.errors import Refusal
from common.model.fusion_model import build_model
from common.model.trainable import frozen_fingerprint, trainable_state
from common.privacy.accounting import epsilon_from_history
from common.privacy.receipts import Receipt, read_receipts
from common.runfolder import RunFolder
from common.secagg import keys, wire
from common.secagg.coordinator import CoordinatorSession
from common.secagg.identity import Signer
from common.secagg.messages import KeyDirectory, PublicKeys, UnmaskRequest, signed_statement
from common.secagg.params import RoundKey, RoundParams
from server.app import run_federation
from server.secure import SecurePlan, _message, round_params
from simulations.demo_data import write_demo_hospitals
from simulations.inprocess import InProcessGrid
from tests.conftest import hospital, request, tiny_run, tiny_user_config

SITES = 3


def _settings(tmp_path: Path, **more: object) -> dict[str, object]:
    return {
        "output-dir": str(tmp_path / "out"),
        "run-name": "secure",
        "state-root": str(tmp_path / "state"),
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,  # evaluation is the same in a secure run: covered elsewhere
        "secure-aggregation": True,
        **more,
    }


@pytest.fixture(scope="module")
def four_hospitals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small demo hospitals (read-only)."""
    root = tmp_path_factory.mktemp("four")
    write_demo_hospitals(root, 4, seed=0, size_scale=0.15)
    return root


class DroppingSites:
    """The sites' ClientApp, but node 4 drops out of round 2 at stage 3 (it never trains);
    every reply the coordinator gets is kept."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, Message]] = []

    def __call__(self, message: Message, context: Context) -> Message:
        config = message.content.config_records.get(R.CONFIG)
        if (
            context.node_id == 4
            and message.metadata.message_type == f"train.{R.SECAGG_MASK}"
            and config is not None
            and config[R.SERVER_ROUND] == 2
        ):
            raise ConnectionError("hospital 4 went offline")
        return client_app(message, context)

    def tap(self, node: int, reply: Message) -> None:
        self.replies.append((node, reply))


def test_a_secure_federation_trains_one_noisy_step_a_round_and_survives_a_dropout(
    four_hospitals: Path, tmp_path: Path
) -> None:
    """4 sites, 1 colluder assumed: t = 3, d = 2; one site drops mid-round in round 2 and the
    round's sum still comes out of the 3 others."""
    settings = _settings(tmp_path)
    sites = DroppingSites()
    grid = InProcessGrid(
        sites,  # type: ignore[arg-type]  # a ClientApp's call
        [{"partition-id": i} for i in range(4)],
        tiny_user_config(four_hospitals, **settings),
        tap=sites.tap,
    )
    folder = RunFolder(run_federation(grid, tiny_run(four_hospitals, **settings)))
    history = folder.read_history()
    assert folder.read_summary().status == "completed", folder.read_summary().message
    assert [h.round for h in history] == [1, 2]
    assert not history[0].failures and "hospital-3" in history[1].failures
    for line in history:
        assert not line.refusals and not line.rejected
        trained = {name for name, site in line.sites.items() if site.train is not None}
        assert trained == ({f"hospital-{i}" for i in range(4 if line.round == 1 else 3)})
        for site in line.sites.values():
            assert site.update_sha256 is None  # no update of its own reached the coordinator
            assert site.train is None or site.train[R.STEPS] == 1
    # nothing the coordinator received holds a site's update: masked ring vectors only
    contents = [m.content for _, m in sites.replies if m.has_content()]
    assert not any(R.ARRAYS in c.array_records for c in contents)
    assert sum(R.MASKED in c.array_records for c in contents) == 4 + 3
    for i in range(4):
        receipts = [
            r
            for r in read_receipts(tmp_path / "state" / f"hospital-{i}" / "state")
            if r.kind == "train"
        ]
        rounds = [1] if i == 3 else [1, 2]
        assert [(r.round, r.steps, r.cohort, r.noise_shares) for r in receipts] == [
            (n, 1, 4, 2) for n in rounds
        ]
        last = receipts[-1]
        assert last.epsilon is not None and last.fallback_epsilon is not None
        # the fallback (its own share alone: z / sqrt(2)) is the weaker guarantee
        assert last.fallback_epsilon > last.epsilon
        z, q = last.noise_multiplier, last.sample_rate
        expected = epsilon_from_history(
            [(z, q, 1)] * len(rounds), delta=last.delta or 0.0, accountant="rdp"
        )
        assert last.epsilon == pytest.approx(expected, rel=1e-6)


# --- the coordinator's attacks on a site's ClientApp --------------------------------------------


class Coordinator:
    """A coordinator that speaks to three simulated hospitals' ClientApps directly, honestly
    unless a test makes it cheat; it holds the real coordinator session (`server.secure`)."""

    def __init__(self, demo_root: Path, tmp_path: Path, *, policy: str = "") -> None:
        settings = _settings(tmp_path)
        # a Message is made inside a Flower task (run 7, the coordinator's node 0)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
        self.run_config = tiny_user_config(demo_root, **settings)
        self.run = tiny_run(demo_root, **settings)
        self.state_root = tmp_path / "state"
        if policy:
            data = tmp_path / "data"
            for i in range(SITES):
                shutil.copytree(demo_root / f"hospital-{i}", data / f"hospital-{i}")
                (data / f"hospital-{i}" / "policy.toml").write_text(policy)
            self.run_config = tiny_user_config(data, **settings)
            self.run = tiny_run(data, **settings)
        self.contexts = {
            node: Context(
                run_id=7,
                node_id=node,
                node_config={"partition-id": node - 1},
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
            for node in range(1, SITES + 1)
        }
        model = build_model(self.run.model)
        self.arrays = ArrayRecord({k: Array(v.numpy()) for k, v in trainable_state(model).items()})
        self.fingerprint = frozen_fingerprint(model)
        self.plan = SecurePlan(colluders=1, max_grad_norm=1.0, learning_rate=0.1, momentum=0.0)

    def config(self, server_round: int) -> ConfigRecord:
        return ConfigRecord(
            {
                R.RUN_KEY: "secure",
                R.FROZEN_FINGERPRINT: self.fingerprint,
                R.SERVER_ROUND: server_round,
            }
        )

    def send(
        self, node: int, action: str, fields: dict, server_round: int = 1, arrays: bool = False
    ) -> Message:
        message = _message(node, action, self.config(server_round), fields)
        if arrays:
            message.content[R.ARRAYS] = self.arrays
        message.metadata.__dict__["_message_id"] = message.object_id
        return client_app(message, self.contexts[node])

    def params(self, cohort: list[int], server_round: int = 1) -> tuple[RoundParams, int]:
        key = RoundKey(run="secure", round=server_round)
        return round_params(round_key=key, cohort=cohort, arrays=self.arrays, plan=self.plan)

    def stage1(self, params: RoundParams, d: int, nodes: list[int]) -> dict[int, Message]:
        fields = {
            **wire.params_fields(params),
            R.SECAGG_MAX_GRAD_NORM: 1.0,
            R.SECAGG_NOISE_SHARES: d,
        }
        return {n: self.send(n, R.SECAGG_KEYS, fields, params.round.round) for n in nodes}

    def receipts(self, node: int) -> list[Receipt]:
        return read_receipts(self.state_root / f"hospital-{node - 1}" / "state")


def _refused(reply: Message) -> str:
    assert reply.has_error(), "the site answered"
    return reply.error.reason or ""


def _keys(reply: Message) -> PublicKeys:
    assert not reply.has_error(), reply.error.reason
    return wire.public_keys_from_fields(dict(reply.content[R.SECAGG]))


def _z(replies: dict[int, Message]) -> float:
    return max(float(r.content[R.METRICS][R.NOISE_MULTIPLIER]) for r in replies.values())


def test_a_cohort_below_the_sites_minimum_gets_no_keys(demo_root: Path, tmp_path: Path) -> None:
    """The site's policy asks for 3 sites at least; the coordinator asks 2."""
    coordinator = Coordinator(demo_root, tmp_path)
    params, d = coordinator.params([1, 2])
    for reply in coordinator.stage1(params, d, [1, 2]).values():
        assert "a cohort of 2 sites; the site's policy needs 3" in _refused(reply)
    assert coordinator.receipts(1) == []


def test_a_coordinator_claiming_a_larger_cohort_than_it_has_gets_no_shares(
    demo_root: Path, tmp_path: Path
) -> None:
    """Two hospitals exist (nodes 1, 2); the coordinator claims a third (node 3) with keys of
    its own, signed by a key outside the hospitals' roster, to read the shares sent to it."""
    coordinator = Coordinator(demo_root, tmp_path)
    params, d = coordinator.params([1, 2, 3])
    real = {n: _keys(r) for n, r in coordinator.stage1(params, d, [1, 2]).items()}
    outsider = Signer.generate()
    encryption, masking = keys.new_private_key(), keys.new_private_key()
    statement = signed_statement(
        round_key=params.round,
        node=3,
        encryption=keys.public_bytes(encryption),
        masking=keys.public_bytes(masking),
    )
    forged = PublicKeys(
        round=params.round,
        node=3,
        encryption=keys.public_bytes(encryption),
        masking=keys.public_bytes(masking),
        identity=outsider.public_bytes(),
        signature=outsider.sign(statement),
    )
    directory = KeyDirectory(round=params.round, keys=(real[1], real[2], forged))
    fields = {**wire.directory_fields(directory), R.SECAGG_NOISE_MULTIPLIER: 5.0}
    for node in (1, 2):
        reply = coordinator.send(node, R.SECAGG_SHARES, fields)
        assert "is not in the roster" in _refused(reply)
    assert coordinator.receipts(1) == [] and coordinator.receipts(2) == []


def test_dropping_sites_to_unmask_one_gets_no_reveal_and_a_replay_gets_nothing(
    demo_root: Path, tmp_path: Path
) -> None:
    """After every site sent its masked vector, the coordinator claims two of three dropped, to
    get the victim's self-mask share from... no one: each site refuses; then it replays the
    round's masked stage and gets nothing more, and nothing more is charged."""
    coordinator = Coordinator(demo_root, tmp_path)
    params, d = coordinator.params([1, 2, 3])
    session = CoordinatorSession(params)
    offers = coordinator.stage1(params, d, [1, 2, 3])
    directory = session.collect_keys(_keys(r) for r in offers.values())
    stage2 = {**wire.directory_fields(directory), R.SECAGG_NOISE_MULTIPLIER: _z(offers)}
    sealed = {
        n: wire.sealed_from_fields(
            dict(coordinator.send(n, R.SECAGG_SHARES, stage2).content[R.SECAGG])
        )
        for n in (1, 2, 3)
    }
    deliveries = session.collect_shares(sealed.values())
    masked = {
        n: coordinator.send(n, R.SECAGG_MASK, wire.delivery_fields(deliveries[n]), arrays=True)
        for n in (1, 2, 3)
    }
    assert all(not m.has_error() for m in masked.values())
    charged = {n: len(coordinator.receipts(n)) for n in (1, 2, 3)}
    assert charged == {1: 1, 2: 1, 3: 1}
    victim = 1
    cheat = UnmaskRequest(round=params.round, dropped=(2, 3), survivors=(victim,))
    reply = coordinator.send(victim, R.SECAGG_REVEAL, wire.unmask_fields(cheat))
    assert "1 survivors, fewer than t=3" in _refused(reply)
    # one claimed dropout: 2 survivors < t = 3 (and < d + colluders = 3)
    cheat = UnmaskRequest(round=params.round, dropped=(3,), survivors=(1, 2))
    reply = coordinator.send(2, R.SECAGG_REVEAL, wire.unmask_fields(cheat))
    assert "2 survivors, fewer than t=3" in _refused(reply)
    # the replay: the same round's masked stage again, to the site that still has a session
    replay = coordinator.send(3, R.SECAGG_MASK, wire.delivery_fields(deliveries[3]), arrays=True)
    assert "already trained and charged" in _refused(replay)
    assert {n: len(coordinator.receipts(n)) for n in (1, 2, 3)} == charged


def test_a_noise_multiplier_below_the_sites_need_is_refused_before_any_charge(
    demo_root: Path, tmp_path: Path
) -> None:
    coordinator = Coordinator(demo_root, tmp_path)
    params, d = coordinator.params([1, 2, 3])
    session = CoordinatorSession(params)
    offers = coordinator.stage1(params, d, [1, 2, 3])
    directory = session.collect_keys(_keys(r) for r in offers.values())
    low = {**wire.directory_fields(directory), R.SECAGG_NOISE_MULTIPLIER: _z(offers) / 10}
    sealed = {
        n: wire.sealed_from_fields(
            dict(coordinator.send(n, R.SECAGG_SHARES, low).content[R.SECAGG])
        )
        for n in (1, 2, 3)
    }
    deliveries = session.collect_shares(sealed.values())
    reply = coordinator.send(1, R.SECAGG_MASK, wire.delivery_fields(deliveries[1]), arrays=True)
    assert "below the" in _refused(reply) and "budget needs" in _refused(reply)
    assert coordinator.receipts(1) == []


def test_a_site_requiring_secure_aggregation_refuses_a_plain_round_and_off_refuses_a_secure_one(
    demo_root: Path, tmp_path: Path
) -> None:
    run = tiny_run(demo_root)
    policy = tmp_path / "policy.toml"
    policy.write_text('secure-aggregation = "require"\n')
    state = SiteState(hospital(demo_root, tmp_path / "state", policy=policy))
    with pytest.raises(Refusal) as refused:
        train_round(state, run, request(state, run, 1))
    assert refused.value.reason == "secagg-required"
    assert read_receipts(tmp_path / "state" / "hospital-0") == []  # nothing trained or charged
    # "off": the site takes part in no secure round (stage 1 is refused before its keys exist)
    policy.write_text('secure-aggregation = "off"\n')
    secure = tiny_run(demo_root, **{"secure-aggregation": True})
    coordinator = Coordinator(demo_root, tmp_path / "c")
    params, d = coordinator.params([1, 2, 3])
    with pytest.raises(Refusal, match='secure-aggregation = "off"'):
        offer_keys(
            state,
            secure,
            replace(request(state, secure, 1, run_key="secure"), parameters={}),
            params,
            SecureTerms(max_grad_norm=1.0, noise_shares=d),
            node=1,
        )
