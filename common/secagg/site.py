"""One site's side of a SecAgg+ round (Bell et al. 2020; Bonawitz et al. 2017), as a state machine.

The coordinator is untrusted: every request is checked against the round the site expects and
its own rules (minimum cohort, safe threshold, never both shares of one neighbour, at least t
survivors). A refused request aborts the session: it answers nothing afterwards.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from numpy.typing import NDArray

from common.errors import ConfigurationError, FedFusionError, Refusal
from common.secagg import keys, masking, sharing
from common.secagg.messages import (
    KeyDirectory,
    MaskedVector,
    PublicKeys,
    Reveal,
    SealedShares,
    ShareDelivery,
    UnmaskRequest,
)
from common.secagg.params import RoundKey, RoundParams, min_safe_threshold
from common.secagg.quantization import to_ring

logger = logging.getLogger(__name__)


class Stage(IntEnum):
    """Where a session is: the last stage it answered."""

    NEW = 0
    KEYS = 1
    SHARED = 2
    MASKED = 3
    REVEALED = 4
    ABORTED = 5


def _refuse(what: str) -> Refusal:
    return Refusal(
        f"secure aggregation: {what}. The site answers nothing more in this round; the "
        "coordinator must start the round again within the site's rules (docs/SECAGG.md)",
        reason="secagg-unsafe",
    )


@dataclass(frozen=True)
class _Peer:
    encryption: X25519PublicKey
    masking: X25519PublicKey


class SiteSession:
    """A site's one round of secure aggregation: keys, shares, masked vector, reveal."""

    def __init__(
        self,
        *,
        node: int,
        round_key: RoundKey,
        min_cohort: int,
        colluders: int,
        noise: NDArray[np.int64] | None = None,
    ) -> None:
        if not 0 <= colluders < min_cohort or min_cohort < 2:
            raise ConfigurationError(
                f"min_cohort {min_cohort} must be >= 2 and colluders {colluders} in "
                "[0, min_cohort): with as many colluders as sites nothing is hidden",
                reason="policy",
            )
        self.node, self.round_key = node, round_key
        self.min_cohort, self.colluders = min_cohort, colluders
        self._noise = noise
        self.stage = Stage.NEW
        self._encryption = keys.new_private_key()
        self._masking = keys.new_private_key()
        self._seed = b""
        self._params: RoundParams | None = None
        self._peers: dict[int, _Peer] = {}  # stage 2: the holders of this site's shares
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (b share, key share)
        self._partners: tuple[int, ...] = ()  # stage 3: the sites this vector is masked with

    @contextmanager
    def _stage(self, expected: Stage, round_key: RoundKey, what: str) -> Iterator[None]:
        """Check a request's stage and round, then do it; any error aborts the session."""
        try:
            if self.stage is not expected:
                raise _refuse(f"{what} arrived after stage {self.stage.name}, not {expected.name}")
            if round_key != self.round_key:
                raise _refuse(f"{what} is for {round_key}, this session is for {self.round_key}")
            yield
        except FedFusionError as e:
            self.stage = Stage.ABORTED
            logger.warning("secure aggregation at node %s aborted: %s", self.node, e.detail)
            raise

    @property
    def params(self) -> RoundParams:
        """The round's parameters, as accepted at stage 1."""
        assert self._params is not None, "stage 1 sets the parameters"
        return self._params

    def advertise(self, params: RoundParams) -> PublicKeys:
        """Stage 1: check the round's parameters against the site's rules; send the public keys."""
        if not isinstance(params, RoundParams):
            raise ConfigurationError("stage 1 carries RoundParams", reason="message")
        with self._stage(Stage.NEW, params.round, "the round parameters"):
            self._check_params(params)
        self._params, self.stage = params, Stage.KEYS
        return PublicKeys(
            round=self.round_key,
            node=self.node,
            encryption=keys.public_bytes(self._encryption),
            masking=keys.public_bytes(self._masking),
        )

    def _check_params(self, params: RoundParams) -> None:
        n = len(params.cohort)
        if self.node not in params.cohort:
            raise _refuse(f"node {self.node} is not in the round's cohort")
        if n < self.min_cohort:
            raise _refuse(f"a cohort of {n} sites; the site's policy needs {self.min_cohort}")
        least = min_safe_threshold(cohort_size=n, colluders=self.colluders)
        if params.threshold < least:
            raise _refuse(
                f"threshold {params.threshold} for {n} sites and up to {self.colluders} "
                f"colluders; at least {least} (t > (n + colluders) / 2) keeps a coordinator "
                "from learning both secrets of one site"
            )
        if self._noise is not None and (
            self._noise.shape != (params.layout.length,)
            or np.abs(self._noise).max(initial=0) > params.noise_bound
        ):
            raise ConfigurationError(
                f"the site's noise must be a vector of {params.layout.length} integers of "
                f"|value| <= noise_bound {params.noise_bound}; sample it for this round's layout",
                reason="node-config",
            )

    def share(self, directory: KeyDirectory) -> SealedShares:
        """Stage 2: make the self-mask seed; share it and the masking key among the holders."""
        with self._stage(Stage.KEYS, directory.round, "the key directory"):
            self._peers = self._check_directory(directory, self.params)
            sealed = self._seal_shares(self.params)
        self.stage = Stage.SHARED
        return SealedShares(round=self.round_key, sender=self.node, sealed=sealed)

    def _check_directory(self, directory: KeyDirectory, params: RoundParams) -> dict[int, _Peer]:
        listed = {k.node: k for k in directory.keys}
        if any(k.round != self.round_key for k in directory.keys):
            raise _refuse("the directory holds public keys of another round")
        strangers = sorted(set(listed) - set(params.cohort))
        if strangers:
            raise _refuse(f"keys for nodes {strangers} outside the cohort fixed at stage 1")
        mine = listed.get(self.node)
        if mine is None or (mine.encryption, mine.masking) != (
            keys.public_bytes(self._encryption),
            keys.public_bytes(self._masking),
        ):
            raise _refuse("the directory does not hold this site's own public keys unchanged")
        if len(listed) < params.threshold:
            raise _refuse(f"{len(listed)} sites in the directory, fewer than t={params.threshold}")
        blobs = [k.encryption for k in directory.keys] + [k.masking for k in directory.keys]
        if len(set(blobs)) != len(blobs):
            raise _refuse("two directory entries share a public key; every key must be fresh")
        return {
            node: _Peer(
                encryption=keys.load_public(k.encryption, owner=node),
                masking=keys.load_public(k.masking, owner=node),
            )
            for node, k in listed.items()
            if node != self.node
        }

    def _seal_shares(self, params: RoundParams) -> dict[int, bytes]:
        self._seed = secrets.token_bytes(sharing.SECRET_BYTES)
        n, t = len(params.cohort), params.threshold
        seed_shares = sharing.split(self._seed, threshold=t, count=n)
        key_shares = sharing.split(keys.private_bytes(self._masking), threshold=t, count=n)
        own = params.position(self.node) - 1
        self._held[self.node] = (seed_shares[own], key_shares[own])
        sealed: dict[int, bytes] = {}
        for node, peer in self._peers.items():
            x = params.position(node) - 1
            key = self._share_key(node, peer)
            context = keys.share_context(self.round_key, self.node, node)
            sealed[node] = keys.seal(key, seed_shares[x] + key_shares[x], context=context)
        return sealed

    def _share_key(self, node: int, peer: _Peer) -> bytes:
        return keys.share_key(
            self._encryption, peer.encryption, round_key=self.round_key, node=self.node, other=node
        )

    def mask(self, delivery: ShareDelivery, vector: NDArray[np.uint64]) -> MaskedVector:
        """Stage 3: keep the shares sent to this site; return its vector (+ noise), masked."""
        with self._stage(Stage.SHARED, delivery.round, "the share delivery"):
            self._take_shares(delivery, self.params)
            masked = self._masked(vector, self.params)
        self.stage = Stage.MASKED
        return MaskedVector(round=self.round_key, node=self.node, vector=masked)

    def _take_shares(self, delivery: ShareDelivery, params: RoundParams) -> None:
        if delivery.recipient != self.node:
            raise _refuse(f"shares addressed to node {delivery.recipient}, not {self.node}")
        strangers = sorted(set(delivery.sealed) - set(self._peers))
        if strangers:
            raise _refuse(f"shares from nodes {strangers} this site did not share keys with")
        if len(delivery.sealed) + 1 < params.threshold:
            raise _refuse(
                f"shares from {len(delivery.sealed)} sites: with this site fewer than "
                f"t={params.threshold}, so the pairwise masks would hide too little"
            )
        for sender, blob in delivery.sealed.items():
            key = self._share_key(sender, self._peers[sender])
            context = keys.share_context(self.round_key, sender, self.node)
            plain = keys.unseal(key, blob, context=context)
            self._held[sender] = (plain[: sharing.SHARE_BYTES], plain[sharing.SHARE_BYTES :])
        self._partners = tuple(sorted(delivery.sealed))

    def _masked(self, vector: NDArray[np.uint64], params: RoundParams) -> NDArray[np.uint64]:
        if vector.dtype != np.uint64 or vector.shape != (params.layout.length,):
            raise ConfigurationError(
                f"the site's vector must be {params.layout.length} uint64 ring elements (pack it "
                "with common.secagg.vector.pack)",
                reason="message",
            )
        if int(vector.max(initial=0)) >= params.modulus:
            raise ConfigurationError(
                f"the site's vector holds values outside the ring of {params.bits} bits (pack it "
                "with common.secagg.vector.pack, under this round's parameters)",
                reason="message",
            )
        total = vector.copy()
        if self._noise is not None:
            total = (total + to_ring(self._noise, bits=params.bits)) & np.uint64(params.modulus - 1)
        seed_key = masking.self_mask_key(self._seed, round_key=self.round_key)
        total = masking.add_mask(total, seed_key, sign=1, bits=params.bits)
        for node in self._partners:
            key = masking.pair_mask_key(
                self._masking,
                self._peers[node].masking,
                round_key=self.round_key,
                node=self.node,
                other=node,
            )
            sign = masking.pair_sign(self.node, node)
            total = masking.add_mask(total, key, sign=sign, bits=params.bits)
        return total

    def reveal(self, request: UnmaskRequest) -> Reveal:
        """Stage 4: per partner, its seed share if it survived or its key share if it dropped."""
        with self._stage(Stage.MASKED, request.round, "the unmask request"):
            self._check_unmask(request, self.params)
        self.stage = Stage.REVEALED
        return Reveal(
            round=self.round_key,
            node=self.node,
            seed_shares={u: self._held[u][0] for u in request.survivors},
            key_shares={u: self._held[u][1] for u in request.dropped},
        )

    def _check_unmask(self, request: UnmaskRequest, params: RoundParams) -> None:
        both = sorted(set(request.dropped) & set(request.survivors))
        if both:
            raise _refuse(f"nodes {both} listed as both dropped and surviving")
        if self.node not in request.survivors:
            raise _refuse("this site is not listed among the survivors")
        if set(request.dropped) | set(request.survivors) != {*self._partners, self.node}:
            raise _refuse(
                "the dropped and surviving lists must be exactly the sites this vector was "
                f"masked with ({len(self._partners)}) and this site"
            )
        if len(request.survivors) < params.threshold:
            raise _refuse(
                f"{len(request.survivors)} survivors, fewer than t={params.threshold}: revealing "
                "the dropped sites' keys would let the coordinator unmask the few survivors"
            )
