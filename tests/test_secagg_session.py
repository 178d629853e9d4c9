"""A site's session kept between Flower messages: `SiteSession.dump` / `load` (versioned JSON)."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest

from common.errors import ConfigurationError, Refusal
from common.secagg.coordinator import CoordinatorSession
from common.secagg.messages import UnmaskRequest
from common.secagg.site import SiteSession, Stage
from tests.secagg_helpers import (
    ROSTER,
    ROUND,
    make_params,
    make_sites,
    plain_sum,
    random_vectors,
    signer_for,
)


def _reloaded(sites: dict[int, SiteSession]) -> dict[int, SiteSession]:
    """Every session through its dump and back, as the round loop keeps it in Context.state."""
    return {
        n: SiteSession.load(s.dump(), signer=signer_for(n), roster=ROSTER) for n, s in sites.items()
    }


def test_a_round_with_every_site_reloaded_between_stages_gives_the_exact_sum() -> None:
    params = make_params(5, 3)
    vectors = random_vectors(params)
    noise = {n: np.full(params.layout.length, n - 103, dtype=np.int64) for n in params.cohort}
    coordinator = CoordinatorSession(params)
    sites = _reloaded(make_sites(params, noise_shares=3))
    directory = coordinator.collect_keys([s.advertise(params) for s in sites.values()])
    sites = _reloaded(sites)
    deliveries = coordinator.collect_shares([s.share(directory) for s in sites.values()])
    sites = _reloaded(sites)
    senders = (101, 102, 103, 104)  # 105 drops out after sharing
    request = coordinator.collect_masked(
        [sites[n].mask(deliveries[n], vectors[n], noise=noise[n]) for n in senders]
    )
    sites = _reloaded(sites)
    result = coordinator.collect_reveals([sites[n].reveal(request) for n in senders])
    assert result.dropped == (105,)
    noise_sum = np.sum([noise[n] for n in senders], axis=0).astype(np.int64).view(np.uint64)
    expected = (plain_sum(vectors, senders, 32) + noise_sum) & np.uint64(2**32 - 1)
    np.testing.assert_array_equal(result.vector, expected)
    done = _reloaded(sites)[101]
    assert done.stage is Stage.REVEALED
    with pytest.raises(Refusal, match="after stage REVEALED"):
        done.reveal(request)  # a reloaded session still answers each stage once


def test_a_reloaded_session_keeps_its_rules() -> None:
    params = make_params(6, 4)
    sites = make_sites(params, colluders=1, noise_shares=5)
    coordinator = CoordinatorSession(params)
    directory = coordinator.collect_keys([s.advertise(params) for s in sites.values()])
    deliveries = coordinator.collect_shares([s.share(directory) for s in sites.values()])
    vectors = random_vectors(params)
    for n, s in sites.items():
        s.mask(deliveries[n], vectors[n])
    site = _reloaded(sites)[101]
    assert (site.min_cohort, site.colluders, site.noise_shares) == (3, 1, 5)
    claim = UnmaskRequest(round=ROUND, dropped=(106,), survivors=(101, 102, 103, 104, 105))
    with pytest.raises(Refusal, match="fewer than the 5 honest noise shares"):
        site.reveal(claim)  # 5 survivors - 1 colluder < 5
    aborted = SiteSession.load(site.dump(), signer=signer_for(101), roster=ROSTER)
    assert aborted.stage is Stage.ABORTED


def _edit(change: Callable[[dict[str, object]], object]) -> bytes:
    params = make_params(4, 3)
    sites = make_sites(params)
    directory = CoordinatorSession(params).collect_keys(
        [s.advertise(params) for s in sites.values()]
    )
    sites[101].share(directory)
    state = json.loads(sites[101].dump())
    change(state)
    return json.dumps(state).encode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x80not json", "cannot be loaded"),
        (b"[1, 2]", "a JSON object"),
        (_edit(lambda s: s.update(version=2)), "not a version 1"),
        (_edit(lambda s: s.pop("held")), "field .held. is missing"),
        (_edit(lambda s: s.update(stage=9)), "not a valid Stage"),
        (_edit(lambda s: s.update(node=True)), "'node' must be int"),
        (_edit(lambda s: s.update(seed="not base64!")), "seed is not base64"),
        (_edit(lambda s: s.update(masking="AAAA")), "masking must be 32 bytes"),
        (_edit(lambda s: s.update(peers={"x1": ["", ""]})), "not a decimal"),
        (_edit(lambda s: s.update(partners=[999])), "masking partners"),
        (_edit(lambda s: s.update(params=None)), "disagree"),
        (_edit(lambda s: s["params"].update(threshold=1)), "threshold 1"),  # type: ignore[attr-defined]
        (_edit(lambda s: s["round"].update(round=-1)), "round must be in"),  # type: ignore[attr-defined]
    ],
)
def test_a_malformed_dump_is_a_configuration_error(data: bytes, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as e:
        SiteSession.load(data, signer=signer_for(101), roster=ROSTER)
    assert e.value.reason == "message"


def test_a_dump_loads_only_with_the_identity_key_it_ran_with() -> None:
    data = _edit(lambda s: None)
    SiteSession.load(data, signer=signer_for(101), roster=ROSTER)
    with pytest.raises(ConfigurationError, match="another identity key"):
        SiteSession.load(data, signer=signer_for(102), roster=ROSTER)
