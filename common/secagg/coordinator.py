"""The coordinator's side of a SecAgg+ round: relay keys and shares, then recover only the sum.

Each stage takes the replies that arrived (a site that did not answer, or answered out of
bounds, has dropped out) and builds the next stage's requests. At the end the survivors' self
masks and the dropped sites' pairwise masks are rebuilt from t shares each, and removed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from common.errors import Failure, Refusal
from common.secagg import keys, masking, sharing
from common.secagg.identity import Roster
from common.secagg.messages import (
    KeyDirectory,
    MaskedVector,
    PublicKeys,
    Reveal,
    SealedShares,
    ShareDelivery,
    UnmaskRequest,
)
from common.secagg.params import RoundParams
from common.secagg.vector import UpdateSum, unpack

logger = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class RoundSum:
    """What the coordinator learns: the sum of the survivors' vectors, and who they were."""

    vector: NDArray[np.uint64]  # (layout.length,) in Z_(2**bits)
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]  # shared their secrets, then sent no vector
    update: UpdateSum  # the vector unpacked: float sums, counts per array, total weight


def _too_few(stage: str, count: int, threshold: int) -> Failure:
    return Failure(
        f"secure aggregation: {count} sites remain after {stage}, fewer than the threshold "
        f"t={threshold}; the sum cannot be recovered: run the round again with more sites",
        reason="secagg-dropouts",
    )


class CoordinatorSession:
    """The coordinator's one round of secure aggregation over `params.cohort`."""

    def __init__(self, params: RoundParams, *, roster: Roster | None = None) -> None:
        self.params = params
        self._roster = roster  # with one, keys no roster member signed are dropped at stage 1
        self._keys: dict[int, PublicKeys] = {}  # U1: answered stage 1
        self._sealed: dict[int, SealedShares] = {}  # U2: shared their secrets
        self._masked: dict[int, MaskedVector] = {}  # U3: sent a masked vector
        self._request: UnmaskRequest | None = None

    def _accept(
        self,
        replies: Iterable[object],
        *,
        kind: type[R],
        sender: Callable[[R], int],
        expected: set[int],
        check: Callable[[R], str | None],
        stage: str,
    ) -> dict[int, R]:
        """The well-formed replies, one per expected sender; any other reply drops its sender."""
        accepted: dict[int, R] = {}
        refused: set[int] = set()
        for reply in replies:
            if not isinstance(reply, kind):
                logger.warning(
                    "secure aggregation %s: a reply that is not %s", stage, kind.__name__
                )
                continue
            node = sender(reply)
            problem = check(reply)
            if node not in expected:
                problem = f"node {node} was not asked"
            elif node in accepted or node in refused:
                problem = f"node {node} replied twice"
            if problem is None and getattr(reply, "round", None) != self.params.round:
                problem = "a reply for another round"
            if problem is not None:
                logger.warning("secure aggregation %s: reply dropped: %s", stage, problem)
                refused.add(node)
                accepted.pop(node, None)
            else:
                accepted[node] = reply
        if len(accepted) < self.params.threshold:
            raise _too_few(stage, len(accepted), self.params.threshold)
        return accepted

    def collect_keys(self, replies: Iterable[PublicKeys]) -> KeyDirectory:
        """Stage 1 -> 2: the public keys of the sites that answered, for every one of them."""
        self._keys = self._accept(
            replies,
            kind=PublicKeys,
            sender=lambda r: r.node,
            expected=set(self.params.cohort),
            check=lambda r: None,
            stage="stage 1 (keys)",
        )
        self._keys = self._usable_keys(self._keys)
        directory = tuple(self._keys[n] for n in sorted(self._keys))
        return KeyDirectory(round=self.params.round, keys=directory)

    def _usable_keys(self, received: dict[int, PublicKeys]) -> dict[int, PublicKeys]:
        """Drop sites whose keys repeat another's or are low-order points, that share one
        identity, or (with a roster) whose signature does not verify: honest sites would refuse
        the whole directory for them (one faulty site must not stop the round)."""
        if self._roster is not None:
            # first, so that a site copying another's identity (without its signature) drops
            # itself only, not the site it copied
            received = {n: k for n, k in received.items() if self._signed(n, k, self._roster)}
        blobs = Counter(b for k in received.values() for b in (k.encryption, k.masking))
        identities = Counter(k.identity for k in received.values())
        probe = X25519PrivateKey.generate()
        usable: dict[int, PublicKeys] = {}
        for node, k in received.items():
            if identities[k.identity] > 1:
                logger.warning("secure aggregation stage 1: node %s shares an identity", node)
                continue
            try:
                for blob in (k.encryption, k.masking):
                    probe.exchange(keys.load_public(blob, owner=node))
            except ValueError:  # a low-order point: the shared secret would be zero
                logger.warning("secure aggregation stage 1: node %s sent a low-order key", node)
                continue
            if blobs[k.encryption] > 1 or blobs[k.masking] > 1:
                logger.warning("secure aggregation stage 1: node %s repeats a public key", node)
                continue
            usable[node] = k
        if len(usable) < self.params.threshold:
            raise _too_few("stage 1 (keys)", len(usable), self.params.threshold)
        return usable

    @staticmethod
    def _signed(node: int, k: PublicKeys, roster: Roster) -> bool:
        try:
            roster.verify(k.identity, k.signature, k.statement())
        except Refusal as e:
            logger.warning("secure aggregation stage 1: node %s: %s", node, e.detail)
            return False
        return True

    def collect_shares(self, replies: Iterable[SealedShares]) -> dict[int, ShareDelivery]:
        """Stage 2 -> 3: to each site that shared, the sealed shares the others addressed to it."""
        holders = set(self._keys)

        def check(reply: SealedShares) -> str | None:
            if set(reply.sealed) != holders - {reply.sender}:
                return f"node {reply.sender} did not address exactly the other key holders"
            return None

        self._sealed = self._accept(
            replies,
            kind=SealedShares,
            sender=lambda r: r.sender,
            expected=holders,
            check=check,
            stage="stage 2 (shares)",
        )
        return {
            recipient: ShareDelivery(
                round=self.params.round,
                recipient=recipient,
                sealed={s: r.sealed[recipient] for s, r in self._sealed.items() if s != recipient},
            )
            for recipient in sorted(self._sealed)
        }

    def collect_masked(self, replies: Iterable[MaskedVector]) -> UnmaskRequest:
        """Stage 3 -> 4: who sent a vector (survivors) and who shared but sent none (dropped)."""
        length, modulus = self.params.layout.length, self.params.modulus

        def check(reply: MaskedVector) -> str | None:
            if reply.vector.shape != (length,) or int(reply.vector.max(initial=0)) >= modulus:
                return f"node {reply.node}'s vector is not {length} elements of the ring"
            return None

        self._masked = self._accept(
            replies,
            kind=MaskedVector,
            sender=lambda r: r.node,
            expected=set(self._sealed),
            check=check,
            stage="stage 3 (masked vectors)",
        )
        self._request = UnmaskRequest(
            round=self.params.round,
            dropped=tuple(sorted(set(self._sealed) - set(self._masked))),
            survivors=tuple(sorted(self._masked)),
        )
        return self._request

    def collect_reveals(self, replies: Iterable[Reveal]) -> RoundSum:
        """Stage 4: rebuild the masks from the shares; the survivors' vectors' sum, unmasked."""
        request = self._request
        assert request is not None, "collect_masked comes first"

        def check(reply: Reveal) -> str | None:
            if set(reply.seed_shares) != set(request.survivors) or set(reply.key_shares) != set(
                request.dropped
            ):
                return f"node {reply.node} did not reveal exactly the shares asked for"
            return None

        reveals = self._accept(
            replies,
            kind=Reveal,
            sender=lambda r: r.node,
            expected=set(request.survivors),
            check=check,
            stage="stage 4 (reveals)",
        )
        total = np.zeros(self.params.layout.length, dtype=np.uint64)
        for reply in self._masked.values():
            total = total + reply.vector  # wraps modulo 2**64; reduced below
        total &= np.uint64(self.params.modulus - 1)
        total = self._remove_self_masks(total, reveals, request.survivors)
        total = self._remove_pair_masks(total, reveals, request)
        return RoundSum(
            vector=total,
            survivors=request.survivors,
            dropped=request.dropped,
            update=unpack(total, params=self.params),
        )

    def _shares(self, reveals: dict[int, Reveal], owner: int, *, seed: bool) -> bytes:
        position = self.params.position
        shares = {
            position(holder): (r.seed_shares if seed else r.key_shares)[owner]
            for holder, r in reveals.items()
        }
        return sharing.combine(shares, threshold=self.params.threshold)

    def _remove_self_masks(
        self, total: NDArray[np.uint64], reveals: dict[int, Reveal], survivors: tuple[int, ...]
    ) -> NDArray[np.uint64]:
        for node in survivors:
            seed = self._shares(reveals, node, seed=True)
            key = masking.self_mask_key(seed, round_key=self.params.round)
            total = masking.add_mask(total, key, sign=-1, bits=self.params.bits)
        return total

    def _remove_pair_masks(
        self, total: NDArray[np.uint64], reveals: dict[int, Reveal], request: UnmaskRequest
    ) -> NDArray[np.uint64]:
        for dropped in request.dropped:
            private = self._recover_key(reveals, dropped)
            for node in request.survivors:
                peer = keys.load_public(self._keys[node].masking, owner=node)
                key = masking.pair_mask_key(
                    private, peer, round_key=self.params.round, node=dropped, other=node
                )
                # the survivor added sign(node, dropped) * mask; take it away
                sign = -masking.pair_sign(node, dropped)
                total = masking.add_mask(total, key, sign=sign, bits=self.params.bits)
        return total

    def _recover_key(self, reveals: dict[int, Reveal], dropped: int) -> X25519PrivateKey:
        raw = self._shares(reveals, dropped, seed=False)
        private = X25519PrivateKey.from_private_bytes(raw)
        if keys.public_bytes(private) != self._keys[dropped].masking:
            raise Failure(
                f"secure aggregation: the shares of node {dropped}'s masking key rebuild a key "
                "that does not match its public key: a site sent a wrong share; the round's sum "
                "cannot be trusted, run it again without that site",
                reason="secagg-dropouts",
            )
        return private
