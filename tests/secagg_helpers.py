"""A whole SecAgg+ round in process, for the secagg tests: sites, coordinator, dropouts."""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.secagg.coordinator import CoordinatorSession, RoundSum
from common.secagg.identity import Roster, Signer
from common.secagg.messages import KeyDirectory, UnmaskRequest
from common.secagg.params import Layout, RoundKey, RoundParams
from common.secagg.site import SiteSession

ROUND = RoundKey(run="run-a", round=3)
LAYOUT = Layout(shapes=(("fusion.weight", (2, 3)), ("head.bias", (2,))))


@functools.cache
def signer_for(node: int) -> Signer:
    """The identity key of the hospital behind `node` (Ed25519: fast; one per node id)."""
    return Signer.generate()


# the consortium: the hospitals behind nodes 101 to 132, and 999 (a site outside the cohorts)
ROSTER = Roster.of(signer_for(n).public_bytes() for n in (*range(101, 133), 999))


def make_site(
    node: int,
    *,
    round_key: RoundKey = ROUND,
    min_cohort: int = 3,
    colluders: int = 0,
    noise_shares: int = 0,
) -> SiteSession:
    """An honest site with its hospital's identity key and the consortium's roster."""
    return SiteSession(
        node=node,
        round_key=round_key,
        min_cohort=min_cohort,
        colluders=colluders,
        noise_shares=noise_shares,
        signer=signer_for(node),
        roster=ROSTER,
    )


def make_params(
    n: int, threshold: int, *, layout: Layout = LAYOUT, round_key: RoundKey = ROUND
) -> RoundParams:
    """Round parameters for nodes 101, 102, ... with a 32-bit ring."""
    return RoundParams(
        round=round_key,
        cohort=tuple(range(101, 101 + n)),
        threshold=threshold,
        bits=32,
        clip=1.0,
        scale=2.0**10,
        noise_bound=1000,
        max_weight=10_000,
        layout=layout,
    )


def make_sites(
    params: RoundParams, *, min_cohort: int = 3, colluders: int = 0, noise_shares: int = 0
) -> dict[int, SiteSession]:
    """One honest session per cohort member."""
    return {
        node: make_site(
            node,
            round_key=params.round,
            min_cohort=min_cohort,
            colluders=colluders,
            noise_shares=noise_shares,
        )
        for node in params.cohort
    }


def random_vectors(params: RoundParams, seed: int = 0) -> dict[int, NDArray[np.uint64]]:
    """A random ring vector per site (as if packed)."""
    rng = np.random.default_rng(seed)
    length = params.layout.length
    return {n: rng.integers(0, 2**20, size=length, dtype=np.uint64) for n in params.cohort}


@dataclass
class Transcript:
    """What the coordinator saw, stage by stage (for the attack tests)."""

    coordinator: CoordinatorSession
    sites: dict[int, SiteSession]
    vectors: dict[int, NDArray[np.uint64]]
    masked: dict[int, NDArray[np.uint64]]
    request: UnmaskRequest
    directory: KeyDirectory  # the public keys relayed at stage 2


def run_to_masked(
    params: RoundParams,
    *,
    drop_keys: Collection[int] = (),
    drop_shares: Collection[int] = (),
    drop_masked: Collection[int] = (),
    noise_shares: int = 0,
) -> Transcript:
    """Stages 1 to 3, with the sites in each drop set silent from that stage on."""
    sites = make_sites(params, noise_shares=noise_shares)
    vectors = random_vectors(params)
    coord = CoordinatorSession(params)
    directory = coord.collect_keys(
        s.advertise(params) for n, s in sites.items() if n not in drop_keys
    )
    alive = [n for n in sites if n not in drop_keys and n not in drop_shares]
    deliveries = coord.collect_shares(sites[n].share(directory) for n in alive)
    alive = [n for n in alive if n not in drop_masked]
    replies = [sites[n].mask(deliveries[n], vectors[n]) for n in alive]
    request = coord.collect_masked(replies)
    masked = {r.node: r.vector for r in replies}
    return Transcript(coord, sites, vectors, masked, request, directory)


def run_round(
    params: RoundParams,
    *,
    drop_keys: Collection[int] = (),
    drop_shares: Collection[int] = (),
    drop_masked: Collection[int] = (),
) -> tuple[RoundSum, Transcript]:
    """A whole honest round; the sites that sent a vector all reveal."""
    t = run_to_masked(params, drop_keys=drop_keys, drop_shares=drop_shares, drop_masked=drop_masked)
    reveals = [t.sites[n].reveal(t.request) for n in t.request.survivors]
    return t.coordinator.collect_reveals(reveals), t


def plain_sum(
    vectors: dict[int, NDArray[np.uint64]], nodes: Collection[int], bits: int
) -> NDArray[np.uint64]:
    """The reference: the sum of the given sites' vectors in Z_(2**bits)."""
    total = sum((vectors[n] for n in nodes), np.zeros_like(next(iter(vectors.values()))))
    return total & np.uint64(2**bits - 1)
