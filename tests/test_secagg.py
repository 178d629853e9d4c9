"""SecAgg+ (common/secagg): the coordinator recovers exactly the survivors' sum, or an error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.errors import ConfigurationError, Failure
from common.secagg import keys, masking, sharing
from common.secagg.coordinator import CoordinatorSession
from common.secagg.messages import MaskedVector
from common.secagg.params import Layout, RoundParams
from common.secagg.vector import pack, unpack
from tests.secagg_helpers import ROUND, make_params, make_sites, plain_sum, run_round, run_to_masked


def test_the_sum_is_exact_with_no_dropouts() -> None:
    params = make_params(5, 3)
    result, t = run_round(params)
    assert result.survivors == params.cohort and result.dropped == ()
    np.testing.assert_array_equal(result.vector, plain_sum(t.vectors, params.cohort, 32))


def test_each_masked_vector_hides_its_site() -> None:
    params = make_params(4, 3)
    t = run_to_masked(params)
    for node, masked in t.masked.items():
        # a masked vector looks uniform in the ring: almost no coordinate equals the input
        assert np.mean(masked == t.vectors[node]) < 0.5
        assert masked.max() >= 2**20  # inputs are below 2**20, masks fill 32 bits


@pytest.mark.parametrize("stage", ["drop_shares", "drop_masked"])
def test_up_to_n_minus_t_dropouts_still_give_the_survivors_exact_sum(stage: str) -> None:
    params = make_params(6, 4)  # n - t = 2 may drop
    result, t = run_round(params, **{stage: [102, 105]})
    assert result.survivors == (101, 103, 104, 106)
    assert result.dropped == ((102, 105) if stage == "drop_masked" else ())
    np.testing.assert_array_equal(result.vector, plain_sum(t.vectors, result.survivors, 32))


def test_dropouts_at_every_stage_together() -> None:
    params = make_params(7, 4)
    result, t = run_round(params, drop_keys=[107], drop_shares=[101], drop_masked=[104])
    assert result.survivors == (102, 103, 105, 106) and result.dropped == (104,)
    np.testing.assert_array_equal(result.vector, plain_sum(t.vectors, result.survivors, 32))


@pytest.mark.parametrize("stage", ["drop_keys", "drop_shares", "drop_masked"])
def test_more_than_n_minus_t_dropouts_give_an_error_not_a_sum(stage: str) -> None:
    params = make_params(5, 3)
    with pytest.raises(Failure, match="fewer than the threshold") as e:
        run_round(params, **{stage: [101, 102, 103]})
    assert e.value.reason == "secagg-dropouts"


def test_too_few_reveals_give_an_error_not_a_sum() -> None:
    params = make_params(5, 3)
    t = run_to_masked(params, drop_masked=[105])
    reveals = [t.sites[n].reveal(t.request) for n in (101, 102)]  # 2 < t answer stage 4
    with pytest.raises(Failure, match="fewer than the threshold"):
        t.coordinator.collect_reveals(reveals)


def test_a_malformed_reply_drops_its_sender_only() -> None:
    params = make_params(5, 3)
    t = run_to_masked(params, drop_masked=[103])
    reveals = [t.sites[n].reveal(t.request) for n in t.request.survivors]
    forged = reveals[0].__class__(
        round=ROUND, node=101, seed_shares={}, key_shares=reveals[0].key_shares
    )
    result = t.coordinator.collect_reveals([forged, *reveals[1:]])  # 101 drops, 3 remain
    np.testing.assert_array_equal(result.vector, plain_sum(t.vectors, t.request.survivors, 32))


def test_a_wrong_key_share_is_detected_not_summed() -> None:
    params = make_params(5, 3)
    t = run_to_masked(params, drop_masked=[105])
    reveals = [t.sites[n].reveal(t.request) for n in t.request.survivors]
    bad = reveals[0].__class__(
        round=ROUND,
        node=reveals[0].node,
        seed_shares=reveals[0].seed_shares,
        key_shares={105: bytes(sharing.SHARE_BYTES)},
    )
    with pytest.raises(Failure, match="does not match its public key"):
        t.coordinator.collect_reveals([bad, *reveals[1:]])


def test_a_masked_vector_outside_the_ring_drops_its_sender() -> None:
    params = make_params(4, 3)
    t = run_to_masked(params, drop_masked=[104])
    big = MaskedVector(
        round=ROUND, node=104, vector=np.full(params.layout.length, 2**40, dtype=np.uint64)
    )
    coordinator = t.coordinator
    request = coordinator.collect_masked(
        [*(MaskedVector(round=ROUND, node=n, vector=v) for n, v in t.masked.items()), big]
    )
    assert request.dropped == (104,)


def test_packed_updates_sum_to_the_arrays_the_indicators_and_the_weights() -> None:
    params = make_params(3, 2)
    rng = np.random.default_rng(0)
    updates = [
        {"fusion.weight": np.full((2, 3), 0.25), "head.bias": np.array([0.5, -0.75])},
        {"fusion.weight": np.full((2, 3), -0.5)},  # did not train head.bias
        {"fusion.weight": np.full((2, 3), 2.0), "head.bias": np.array([-1.0, 1.0])},  # clipped
    ]
    vectors = [
        pack(u, weight=w, params=params, rng=rng)
        for u, w in zip(updates, (10, 20, 30), strict=True)
    ]
    total = sum(vectors, np.zeros(params.layout.length, dtype=np.uint64)) & np.uint64(2**32 - 1)
    summed = unpack(total, params=params)
    # quarters and halves are exact on a grid of 2**-10: no rounding
    np.testing.assert_array_equal(summed.sums["fusion.weight"], np.full((2, 3), 0.75))
    np.testing.assert_array_equal(summed.sums["head.bias"], np.array([-0.5, 0.25]))
    assert summed.counts == {"fusion.weight": 3, "head.bias": 2}
    assert summed.weight == 60


def test_stochastic_rounding_is_unbiased() -> None:
    layout = Layout(shapes=(("w", (20_000,)),))
    params = make_params(3, 2, layout=layout)
    vector = pack(
        {"w": np.full(20_000, 0.3 / 1024)}, weight=1, params=params, rng=np.random.default_rng(1)
    )
    mean = unpack(vector, params=params).sums["w"].mean()
    assert mean == pytest.approx(0.3 / 1024, rel=0.05)


def test_pack_refuses_arrays_outside_the_layout() -> None:
    params = make_params(3, 2)
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigurationError, match="does not name"):
        pack({"other": np.zeros(2)}, weight=1, params=params, rng=rng)
    with pytest.raises(ConfigurationError, match="shape"):
        pack({"head.bias": np.zeros(3)}, weight=1, params=params, rng=rng)
    with pytest.raises(ConfigurationError, match="weight"):
        pack({}, weight=10_001, params=params, rng=rng)


def test_a_round_whose_sum_could_overflow_the_ring_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="overflow"):
        RoundParams(
            round=ROUND,
            cohort=(1, 2, 3),
            threshold=2,
            bits=16,
            clip=1.0,
            scale=2.0**14,
            max_weight=1,
            layout=Layout(shapes=(("w", (1,)),)),
        )


def test_site_noise_is_added_under_the_masks() -> None:
    params = make_params(4, 3)
    noise = {
        n: np.full(params.layout.length, k - 2, dtype=np.int64) for k, n in enumerate(params.cohort)
    }
    sites = make_sites(params)
    coordinator = CoordinatorSession(params)
    directory = coordinator.collect_keys(s.advertise(params) for s in sites.values())
    deliveries = coordinator.collect_shares(s.share(directory) for s in sites.values())
    vector = np.full(params.layout.length, 100, dtype=np.uint64)
    request = coordinator.collect_masked(
        s.mask(deliveries[n], vector, noise=noise[n]) for n, s in sites.items()
    )
    result = coordinator.collect_reveals(s.reveal(request) for s in sites.values())
    # 4 x 100 + (-2 - 1 + 0 + 1)
    np.testing.assert_array_equal(result.vector, np.full(params.layout.length, 398))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"cohort": (3, 2, 1)}, "sorted"),
        ({"cohort": (1, 1, 2)}, "sorted"),
        ({"cohort": (1,)}, "2 to 64"),
        ({"cohort": tuple(range(65))}, "2 to 64"),
        ({"cohort": (-1, 2, 3)}, "unsigned"),
        ({"threshold": 4}, "threshold"),
        ({"threshold": 1}, "threshold"),
        ({"bits": 63}, "bits"),
        ({"clip": float("nan")}, "clip"),
        ({"scale": True}, "scale"),
        ({"max_weight": 0}, "max_weight"),
    ],
)
def test_round_parameters_out_of_bounds_are_rejected(change: dict[str, object], match: str) -> None:
    base = {
        "round": ROUND,
        "cohort": (1, 2, 3),
        "threshold": 2,
        "bits": 32,
        "clip": 1.0,
        "scale": 16.0,
        "max_weight": 100,
        "layout": Layout(shapes=(("w", (4,)),)),
    }
    with pytest.raises(ConfigurationError, match=match):
        RoundParams(**{**base, **change})  # type: ignore[arg-type]


def test_a_site_that_copies_another_sites_key_is_left_out_and_the_round_goes_on() -> None:
    params = make_params(7, 4)
    sites = make_sites(params)
    coordinator = CoordinatorSession(params)
    replies = {n: s.advertise(params) for n, s in sites.items()}
    replies[105] = dataclasses.replace(replies[105], masking=replies[101].masking)  # a copy
    replies[104] = dataclasses.replace(replies[104], encryption=bytes(32))  # a low-order key
    directory = coordinator.collect_keys(replies.values())
    assert [k.node for k in directory.keys] == [102, 103, 106, 107]  # 101's key was repeated
    deliveries = coordinator.collect_shares(sites[n].share(directory) for n in (102, 103, 106, 107))
    assert set(deliveries) == {102, 103, 106, 107}


def test_any_t_shares_rebuild_a_secret_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = sharing.split(secret, threshold=3, count=5)
    for chosen in ((1, 2, 3), (5, 3, 1), (2, 4, 5)):
        assert sharing.combine({x: shares[x - 1] for x in chosen}, threshold=3) == secret
    with pytest.raises(Failure, match="2 shares of a secret, 3 are needed"):
        sharing.combine({1: shares[0], 2: shares[1]}, threshold=3)


def test_both_ends_of_a_pair_derive_the_same_mask_key_and_a_round_changes_it() -> None:
    a, b = keys.new_private_key(), keys.new_private_key()
    a_pub = keys.load_public(keys.public_bytes(a), owner=1)
    b_pub = keys.load_public(keys.public_bytes(b), owner=2)
    at_a = masking.pair_mask_key(a, b_pub, round_key=ROUND, node=1, other=2)
    at_b = masking.pair_mask_key(b, a_pub, round_key=ROUND, node=2, other=1)
    later = dataclasses.replace(ROUND, round=ROUND.round + 1)
    assert at_a == at_b != masking.pair_mask_key(a, b_pub, round_key=later, node=1, other=2)
    assert masking.pair_sign(1, 2) == -masking.pair_sign(2, 1)


@pytest.mark.parametrize(
    "noise",
    [np.zeros(3, dtype=np.int64), np.full(11, 1001, dtype=np.int64), np.zeros(11, dtype=float)],
    ids=["wrong-length", "above-noise-bound", "not-integers"],
)
def test_noise_out_of_bounds_is_refused_at_stage_3(noise: np.ndarray) -> None:
    """The noise is given with the vector (stage 3) and checked against the round's layout and
    noise bound then (the vector here has 6 + 2 coordinates, 2 indicators and the weight;
    noise_bound 1000)."""
    params = make_params(4, 3)
    sites = make_sites(params)
    coordinator = CoordinatorSession(params)
    directory = coordinator.collect_keys(s.advertise(params) for s in sites.values())
    deliveries = coordinator.collect_shares(s.share(directory) for s in sites.values())
    vector = np.zeros(params.layout.length, dtype=np.uint64)
    with pytest.raises(ConfigurationError, match="noise_bound 1000") as e:
        sites[101].mask(deliveries[101], vector, noise=noise)
    assert e.value.reason == "node-config"
    sites[102].mask(deliveries[102], vector, noise=np.full(11, -1000, dtype=np.int64))
