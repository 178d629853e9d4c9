"""Secure aggregation in the round loop: the real ServerApp and ClientApp, in process.

The honest federation first (each round one noisy DP-SGD step whose clipped sums the coordinator
sees only in sum, each site charged at the sum's noise multiplier, its receipt holding the
fallback guarantee); then a coordinator's attacks on a site's ClientApp, each written as the
attack: the site answers nothing that would unmask it beyond its policy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from client.app import app as client_app
from common import protocol as R
from common.privacy.accounting import epsilon_from_history
from common.privacy.receipts import read_receipts
from common.runfolder import RunFolder
from server.app import run_federation
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_run, tiny_user_config

SITES = 3


def _settings(tmp_path: Path, **more: object) -> dict[str, object]:
    return {
        "output-dir": str(tmp_path / "out"),
        "run-name": "secure",
        "state-root": str(tmp_path / "state"),
        "num-server-rounds": 2,
        "secure-aggregation": True,
        **more,
    }


class Tap:
    """What the coordinator received from each node: every reply's content."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, Message]] = []

    def __call__(self, node: int, reply: Message) -> None:
        self.replies.append((node, reply))


def test_a_secure_federation_trains_and_charges_each_site_one_noisy_step_a_round(
    demo_root: Path, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    tap = Tap()
    grid = InProcessGrid(
        client_app,
        [{"partition-id": i} for i in range(SITES)],
        tiny_user_config(demo_root, **settings),
        tap=tap,
    )
    folder = RunFolder(run_federation(grid, tiny_run(demo_root, **settings)))
    history = folder.read_history()
    assert folder.read_summary().status == "completed", folder.read_summary().message
    assert [h.round for h in history] == [1, 2]
    for line in history:
        assert not line.refusals and not line.failures and not line.rejected
        for site in line.sites.values():
            assert site.train is not None and site.train[R.STEPS] == 1
            assert site.update_sha256 is None  # no update of its own reached the coordinator
    # no reply carried a site's update: only masked ring vectors, keys, shares and metrics
    masked = [m for _, m in tap.replies if R.MASKED in m.content.array_records]
    assert len(masked) == SITES * 2
    assert not any(R.ARRAYS in m.content.array_records for _, m in tap.replies)
    for i in range(SITES):
        receipts = [
            r
            for r in read_receipts(tmp_path / "state" / f"hospital-{i}" / "state")
            if r.kind == "train"
        ]
        assert [(r.round, r.steps, r.cohort, r.noise_shares) for r in receipts] == [
            (1, 1, 3, 2),
            (2, 1, 3, 2),
        ]
        last = receipts[-1]
        assert last.epsilon is not None and last.fallback_epsilon is not None
        # the fallback (own share alone, z / sqrt(2)) is the weaker guarantee
        assert last.fallback_epsilon > last.epsilon
        z, q = last.noise_multiplier, last.sample_rate
        expected = epsilon_from_history([(z, q, 1), (z, q, 1)], delta=last.delta or 0.0,
                                        accountant="rdp")
        assert last.epsilon == pytest.approx(expected, rel=1e-6)


# --- the coordinator's attacks on a site's ClientApp --------------------------------------------


class Coordinator:
    """A coordinator that speaks to three simulated hospitals' ClientApps directly, honestly
    unless a test makes it cheat; it holds the real coordinator session (`server.secure`)."""

    def __init__(self, demo_root: Path, tmp_path: Path, *, policy: str = "") -> None:
        settings = _settings(tmp_path)
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
        self.arrays = ArrayRecord(
            {k: Array(v.numpy()) for k, v in trainable_state(model).items()}
        )
        self.fingerprint = frozen_fingerprint(model, self.run.model)
        self.plan = SecurePlan(colluders=1, max_grad_norm=1.0, learning_rate=0.1, momentum=0.0)

    def config(self, server_round: int) -> ConfigRecord:
        return ConfigRecord(
            {R.RUN_KEY: "secure", R.FROZEN_FINGERPRINT: self.fingerprint, R.SERVER_ROUND: server_round}
        )

    def send(self, node: int, action: str, fields: dict, server_round: int = 1,
             arrays: bool = False) -> Message:
        message = _message(node, action, self.config(server_round), fields)
        if arrays:
            message.content[R.ARRAYS] = self.arrays
        message.metadata.__dict__["_message_id"] = message.object_id
        return client_app(message, self.contexts[node])

    def params(self, cohort: list[int], server_round: int = 1) -> tuple[RoundParams, int]:
        key = RoundKey(run="secure", round=server_round)
        return round_params(round_key=key, cohort=cohort, arrays=self.arrays, plan=self.plan)

    def stage1(self, params: RoundParams, d: int, nodes: list[int]) -> dict[int, Message]:
        fields = {**wire.params_fields(params), R.SECAGG_MAX_GRAD_NORM: 1.0, R.SECAGG_NOISE_SHARES: d}
        return {n: self.send(n, R.SECAGG_KEYS, fields, params.round.round) for n in nodes}

    def receipts(self, node: int) -> list:
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
    for reply in coordinator.stage1(params, 1, [1, 2]).values():
        assert "secagg-unsafe" in _refused(reply)
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
    forged = PublicKeys(
        round=params.round,
        node=3,
        encryption=keys.public_bytes(encryption),
        masking=keys.public_bytes(masking),
        identity=outsider.public_bytes(),
        signature=b"",
    )
    forged = replace(forged, signature=outsider.sign(signed_bytes(forged)))
    directory = KeyDirectory(round=params.round, keys=(real[1], real[2], forged))
    fields = {**wire.directory_fields(directory), R.SECAGG_NOISE_MULTIPLIER: 5.0}
    for node in (1, 2):
        assert "secagg-unsafe" in _refused(coordinator.send(node, R.SECAGG_SHARES, fields))
    # control: with only the hospitals' own keys the same directory is answered... by nobody
    # either, since two sites are below the policy's minimum: the forged slot was the only way
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
        n: wire.sealed_from_fields(dict(coordinator.send(n, R.SECAGG_SHARES, stage2).content[R.SECAGG]))
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
    assert "secagg-unsafe" in _refused(
        coordinator.send(victim, R.SECAGG_REVEAL, wire.unmask_fields(cheat))
    )
    # one claimed dropout: 2 survivors < t = 3 (and < d + colluders = 3)
    cheat = UnmaskRequest(round=params.round, dropped=(3,), survivors=(1, 2))
    for node in (1, 2):
        assert "secagg-unsafe" in _refused(
            coordinator.send(node, R.SECAGG_REVEAL, wire.unmask_fields(cheat))
        )
    # the replay: the same round's masked stage again, to the site that still has a session
    replay = coordinator.send(3, R.SECAGG_MASK, wire.delivery_fields(deliveries[3]), arrays=True)
    assert "secagg-unsafe" in _refused(replay)
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
        n: wire.sealed_from_fields(dict(coordinator.send(n, R.SECAGG_SHARES, low).content[R.SECAGG]))
        for n in (1, 2, 3)
    }
    deliveries = session.collect_shares(sealed.values())
    reply = coordinator.send(1, R.SECAGG_MASK, wire.delivery_fields(deliveries[1]), arrays=True)
    assert "secagg-unsafe" in _refused(reply)
    assert coordinator.receipts(1) == []
