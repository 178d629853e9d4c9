"""A whole SecAgg+ round in process, for the secagg tests: sites, coordinator, dropouts."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.secagg.coordinator import CoordinatorSession, RoundSum
from common.secagg.messages import KeyDirectory, UnmaskRequest
from common.secagg.params import Layout, RoundKey, RoundParams
from common.secagg.site import SiteSession

ROUND = RoundKey(run="run-a", round=3)
LAYOUT = Layout(shapes=(("fusion.weight", (2, 3)), ("head.bias", (2,))))


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
    params: RoundParams, *, min_cohort: int = 3, colluders: int = 0
) -> dict[int, SiteSession]:
    """One honest session per cohort member."""
    return {
        node: SiteSession(
            node=node, round_key=params.round, min_cohort=min_cohort, colluders=colluders
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
) -> Transcript:
    """Stages 1 to 3, with the sites in each drop set silent from that stage on."""
    sites = make_sites(params)
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


def run_round(params: RoundParams, **drops: Collection[int]) -> tuple[RoundSum, Transcript]:
    """A whole honest round; the sites that sent a vector all reveal."""
    t = run_to_masked(params, **drops)
    reveals = [t.sites[n].reveal(t.request) for n in t.request.survivors]
    return t.coordinator.collect_reveals(reveals), t


def plain_sum(
    vectors: dict[int, NDArray[np.uint64]], nodes: Collection[int], bits: int
) -> NDArray[np.uint64]:
    """The reference: the sum of the given sites' vectors in Z_(2**bits)."""
    total = sum((vectors[n] for n in nodes), np.zeros_like(next(iter(vectors.values()))))
    return total & np.uint64(2**bits - 1)
