"""What travels in each stage, checked for type and size where it is built from the other side.

Stage 1: the coordinator sends `RoundParams`; each site replies `PublicKeys`.
Stage 2: the coordinator sends `KeyDirectory`; each site replies `SealedShares`.
Stage 3: the coordinator sends each site its `ShareDelivery`; each site replies `MaskedVector`.
Stage 4: the coordinator sends `UnmaskRequest`; each surviving site replies `Reveal`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.errors import ConfigurationError
from common.secagg.identity import MAX_IDENTITY_BYTES, MAX_SIGNATURE_BYTES
from common.secagg.keys import KEY_BYTES, NONCE_BYTES, TAG_BYTES, encode_ids
from common.secagg.params import MAX_COHORT, MAX_NODE_ID, RoundKey
from common.secagg.sharing import SHARE_BYTES

SEALED_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES  # a share pair, encrypted
_KEYS_TAG = b"fedfusion-secagg public-keys v1\x00"  # what a site's identity signature is for


def _malformed(what: str) -> ConfigurationError:
    return ConfigurationError(
        f"secure aggregation message: {what}; the sender is faulty or runs another version",
        reason="message",
    )


def _check_node(node: object, role: str) -> None:
    if type(node) is not int or not 0 <= node <= MAX_NODE_ID:
        raise _malformed(f"the {role} must be an unsigned 64-bit node id, not {node!r}")


def _check_round(round_key: object) -> None:
    if not isinstance(round_key, RoundKey):
        raise _malformed("the round must be a RoundKey")


def _check_blobs(blobs: object, *, size: int, what: str) -> None:
    """A map of node id -> bytes of exactly `size` bytes, of at most a cohort's length."""
    if not isinstance(blobs, Mapping) or len(blobs) > MAX_COHORT:
        raise _malformed(f"{what} must map at most {MAX_COHORT} node ids to bytes")
    for node, blob in blobs.items():
        _check_node(node, f"node of {what}")
        if not isinstance(blob, bytes) or len(blob) != size:
            raise _malformed(f"{what} for node {node} must be {size} bytes")


def _check_nodes(nodes: object, what: str) -> None:
    if not isinstance(nodes, tuple) or len(nodes) > MAX_COHORT:
        raise _malformed(f"{what} must be a tuple of at most {MAX_COHORT} node ids")
    for node in nodes:
        _check_node(node, what)
    if len(set(nodes)) != len(nodes):
        raise _malformed(f"{what} lists a node twice")


def signed_statement(*, round_key: RoundKey, node: int, encryption: bytes, masking: bytes) -> bytes:
    """What a site's identity key signs: its two public keys, for this node, in this round."""
    # the tag keeps the signature from serving any other protocol the identity key is used for;
    # the round's encoding is length-prefixed and every other field has a fixed size
    return _KEYS_TAG + round_key.encode() + encode_ids(node) + encryption + masking


@dataclass(frozen=True, kw_only=True)
class PublicKeys:
    """Stage 1 reply: a site's public keys for encrypting shares and for pairwise masks, signed
    by its hospital's identity key."""

    round: RoundKey
    node: int
    encryption: bytes  # X25519, 32 bytes
    masking: bytes  # X25519, 32 bytes
    identity: bytes  # the hospital's identity public key, OpenSSH wire encoding (P-384: 136)
    signature: bytes  # of `statement()` by `identity` (P-384: 96 bytes, r || s)

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_node(self.node, "sender")
        for key in (self.encryption, self.masking):
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise _malformed(f"node {self.node}'s public keys must be {KEY_BYTES} bytes each")
        for name, limit in (("identity", MAX_IDENTITY_BYTES), ("signature", MAX_SIGNATURE_BYTES)):
            blob = getattr(self, name)
            if not isinstance(blob, bytes) or not 0 < len(blob) <= limit:
                raise _malformed(f"node {self.node}'s {name} must be 1 to {limit} bytes")

    def statement(self) -> bytes:
        """The bytes `signature` signs."""
        return signed_statement(
            round_key=self.round, node=self.node, encryption=self.encryption, masking=self.masking
        )


@dataclass(frozen=True, kw_only=True)
class KeyDirectory:
    """Stage 2 request: the public keys of every site that answered stage 1."""

    round: RoundKey
    keys: tuple[PublicKeys, ...]  # sorted by node

    def __post_init__(self) -> None:
        _check_round(self.round)
        if not isinstance(self.keys, tuple) or not all(
            isinstance(k, PublicKeys) for k in self.keys
        ):
            raise _malformed("the key directory must be a tuple of PublicKeys")
        _check_nodes(tuple(k.node for k in self.keys), "the key directory")


@dataclass(frozen=True, kw_only=True)
class SealedShares:
    """Stage 2 reply: the sender's share pair for each other site, encrypted for that site."""

    round: RoundKey
    sender: int
    sealed: Mapping[int, bytes]  # recipient -> nonce || AES-GCM(b share || key share) || tag

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_node(self.sender, "sender")
        _check_blobs(self.sealed, size=SEALED_BYTES, what="the sealed shares")


@dataclass(frozen=True, kw_only=True)
class ShareDelivery:
    """Stage 3 request: the sealed shares addressed to one site, by sender."""

    round: RoundKey
    recipient: int
    sealed: Mapping[int, bytes]  # sender -> sealed share pair

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_node(self.recipient, "recipient")
        _check_blobs(self.sealed, size=SEALED_BYTES, what="the delivered shares")


@dataclass(frozen=True, kw_only=True)
class MaskedVector:
    """Stage 3 reply: the site's vector, masked, in Z_(2**bits)."""

    round: RoundKey
    node: int
    vector: NDArray[np.uint64]  # (layout.length,)

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_node(self.node, "sender")
        if not isinstance(self.vector, np.ndarray) or self.vector.dtype != np.uint64:
            raise _malformed("the masked vector must be a numpy array of uint64")
        if self.vector.ndim != 1:
            raise _malformed(f"the masked vector must be flat, not of shape {self.vector.shape}")


@dataclass(frozen=True, kw_only=True)
class UnmaskRequest:
    """Stage 4 request: who shared then dropped (key shares) and who survived (seed shares)."""

    round: RoundKey
    dropped: tuple[int, ...]
    survivors: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_nodes(self.dropped, "the dropped list")
        _check_nodes(self.survivors, "the survivor list")


@dataclass(frozen=True, kw_only=True)
class Reveal:
    """Stage 4 reply: shares of the survivors' self-mask seeds and of the dropped sites' keys."""

    round: RoundKey
    node: int
    seed_shares: Mapping[int, bytes]  # survivor -> its b share held by `node`
    key_shares: Mapping[int, bytes]  # dropped site -> its masking-key share held by `node`

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_node(self.node, "sender")
        _check_blobs(self.seed_shares, size=SHARE_BYTES, what="the seed shares")
        _check_blobs(self.key_shares, size=SHARE_BYTES, what="the key shares")
