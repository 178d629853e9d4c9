"""One SecAgg+ round in process (common/secagg): wall time per stage, bytes per site per stage.

Each site signs its public keys with an EC P-384 identity key (as FedFusion's SuperNode keys are)
and checks every relayed key against the roster; `identity_seconds` is the part of a stage's time
spent on that (all sites together), measured by repeating the signatures and checks.

`python -m benchmarks.secagg_round [--sites 10] [--coordinates 30000] [--dropped 0]`. Not yet one
of the runner's benchmarks: the protocol is not wired into the round loop's messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TypeVar

import numpy as np

from common.secagg.coordinator import CoordinatorSession
from common.secagg.identity import Roster, Signer
from common.secagg.messages import (
    KeyDirectory,
    MaskedVector,
    PublicKeys,
    Reveal,
    SealedShares,
    ShareDelivery,
    UnmaskRequest,
)
from common.secagg.params import Layout, RoundKey, RoundParams
from common.secagg.site import SiteSession
from common.secagg.vector import pack

log = logging.getLogger(__name__)
T = TypeVar("T")
ID_BYTES = 8  # a node id as it would travel


@dataclass(frozen=True, kw_only=True)
class StageCost:
    """One stage: seconds for all sites and the coordinator, bytes one site sends and receives."""

    seconds: float
    site_upload_bytes: int
    site_download_bytes: int
    identity_seconds: float = 0.0  # signing (stage 1) or checking signatures (stage 2)


def payload_bytes(message: object) -> int:
    """The bytes a message's contents take: keys, ciphertexts, shares, vectors, node ids."""
    total = 0
    for field in fields(message):  # type: ignore[arg-type]  # every message is a dataclass
        value = getattr(message, field.name)
        if isinstance(value, bytes):
            total += len(value)
        elif isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, int):
            total += ID_BYTES
        elif isinstance(value, dict):
            total += sum(ID_BYTES + len(blob) for blob in value.values())
        elif isinstance(value, tuple):
            total += sum(payload_bytes(v) if isinstance(v, PublicKeys) else ID_BYTES for v in value)
    return total


def _timed(work: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def measure(*, sites: int, coordinates: int, dropped: int = 0) -> dict[str, StageCost]:
    """Run one round; `dropped` sites share their secrets, then send no vector."""
    params = RoundParams(
        round=RoundKey(run="bench", round=1),
        cohort=tuple(range(1, sites + 1)),
        threshold=sites // 2 + 1,
        bits=32,
        clip=1.0,
        scale=2.0**16,
        max_weight=100_000,
        layout=Layout(shapes=(("update", (coordinates,)),)),
    )
    rng = np.random.default_rng(0)
    vectors = {
        n: pack({"update": rng.normal(0, 0.1, coordinates)}, weight=100, params=params, rng=rng)
        for n in params.cohort
    }
    signers = {n: Signer.generate(algorithm="ecdsa-p384") for n in params.cohort}
    roster = Roster.of(s.public_bytes() for s in signers.values())
    sessions, s0 = _timed(
        lambda: {
            n: SiteSession(
                node=n,
                round_key=params.round,
                min_cohort=3,
                colluders=0,
                signer=signers[n],
                roster=roster,
            )
            for n in params.cohort
        }
    )  # each session makes its two key pairs
    coordinator = CoordinatorSession(params)
    keys, s1 = _timed(lambda: [s.advertise(params) for s in sessions.values()])
    directory, c1 = _timed(lambda: coordinator.collect_keys(keys))
    sealed, s2 = _timed(lambda: [s.share(directory) for s in sessions.values()])
    deliveries, c2 = _timed(lambda: coordinator.collect_shares(sealed))
    senders = params.cohort[dropped:]
    masked, s3 = _timed(lambda: [sessions[n].mask(deliveries[n], vectors[n]) for n in senders])
    request, c3 = _timed(lambda: coordinator.collect_masked(masked))
    reveals, s4 = _timed(lambda: [sessions[n].reveal(request) for n in request.survivors])
    result, c4 = _timed(lambda: coordinator.collect_reveals(reveals))
    expected = sum((vectors[n] for n in senders), np.zeros_like(vectors[1])) & np.uint64(2**32 - 1)
    assert np.array_equal(result.vector, expected), "the sum is exact"
    # the identity part of stages 1 and 2: every site signs once, and checks every entry
    _, signing = _timed(lambda: [signers[k.node].sign(k.statement()) for k in keys])

    def check_all() -> None:
        for _ in sessions:
            for k in directory.keys:
                roster.verify(k.identity, k.signature, k.statement())

    _, checking = _timed(check_all)
    return {
        "1-keys": _cost(s0 + s1 + c1, keys[0], params, identity=signing),
        "2-shares": _cost(s2 + c2, sealed[0], directory, identity=checking),
        "3-masked": _cost(s3 + c3, masked[-1], deliveries[senders[-1]]),
        "4-reveal": _cost(s4 + c4, reveals[-1], request),
    }


def _cost(
    seconds: float,
    upload: PublicKeys | SealedShares | MaskedVector | Reveal,
    download: RoundParams | KeyDirectory | ShareDelivery | UnmaskRequest,
    *,
    identity: float = 0.0,
) -> StageCost:
    if isinstance(download, RoundParams):
        down = len(download.cohort) * ID_BYTES + 64  # the cohort and a few numbers
    else:
        down = payload_bytes(download)
    return StageCost(
        seconds=seconds,
        site_upload_bytes=payload_bytes(upload),
        site_download_bytes=down,
        identity_seconds=identity,
    )


def main() -> None:
    """Measure one round and log the costs as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.secagg_round")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--coordinates", type=int, default=30_000)
    parser.add_argument("--dropped", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    costs = measure(sites=args.sites, coordinates=args.coordinates, dropped=args.dropped)
    total = time.perf_counter() - start
    log.info(json.dumps({"total_seconds": total, **{k: asdict(v) for k, v in costs.items()}}))


if __name__ == "__main__":
    main()
