"""Key agreement (X25519 + HKDF-SHA256) and authenticated encryption (AES-256-GCM) of shares."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import ConfigurationError, Refusal
from common.secagg.params import RoundKey

KEY_BYTES = 32  # X25519 public and private keys, and every derived key
NONCE_BYTES = 12
TAG_BYTES = 16
_RAW = serialization.Encoding.Raw


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key (one per purpose, per round)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of a private key."""
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (what is secret-shared)."""
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def raw_public(key: X25519PublicKey) -> bytes:
    """The raw 32 bytes of a public key."""
    return key.public_bytes(_RAW, serialization.PublicFormat.Raw)


def load_private(raw: bytes) -> X25519PrivateKey:
    """A private key from its raw 32 bytes (a session restored from the site's memory)."""
    return X25519PrivateKey.from_private_bytes(raw)


def load_public(raw: object, *, owner: int) -> X25519PublicKey:
    """A peer's public key from untrusted bytes: exactly 32 bytes."""
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise ConfigurationError(
            f"node {owner}'s public key must be {KEY_BYTES} raw bytes (X25519); the message is "
            "malformed or from another protocol version",
            reason="message",
        )
    return X25519PublicKey.from_public_bytes(raw)


def derive(secret: bytes, *, info: bytes) -> bytes:
    """A 32-byte key for one purpose from a secret (HKDF-SHA256, RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer: X25519PublicKey, *, info: bytes) -> bytes:
    """The key two parties share for the purpose `info` (X25519, then HKDF)."""
    try:
        shared = private.exchange(peer)
    except ValueError as e:  # a low-order point gives the all-zero secret
        raise Refusal(
            "a peer's public key is a low-order point, which would make the shared key public; "
            "the coordinator relayed a forged key",
            reason="secagg-unsafe",
        ) from e
    return derive(shared, info=info)


def seal(key: bytes, plaintext: bytes, *, context: bytes) -> bytes:
    """Encrypt and authenticate `plaintext`, bound to `context`: nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, sealed: bytes, *, context: bytes) -> bytes:
    """Decrypt what `seal` made under the same key and context, or refuse it."""
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context)
    except InvalidTag as e:
        raise Refusal(
            "an encrypted share does not decrypt under the pair's key and this round's context: "
            "it was altered, misaddressed or replayed from another round",
            reason="secagg-unsafe",
        ) from e


def encode_ids(*nodes: int) -> bytes:
    """Node ids as 8 bytes each, for key derivation and encryption contexts."""
    return b"".join(n.to_bytes(8, "big") for n in nodes)


def share_key(
    private: X25519PrivateKey, peer: X25519PublicKey, *, round_key: RoundKey, node: int, other: int
) -> bytes:
    """The key that encrypts the shares `node` and `other` send each other in this round."""
    low, high = sorted((node, other))
    info = b"fedfusion-secagg share-key " + round_key.encode() + encode_ids(low, high)
    return agree(private, peer, info=info)


def share_context(round_key: RoundKey, sender: int, recipient: int) -> bytes:
    """What a sealed share pair is bound to: this round, who sent it, to whom."""
    return b"fedfusion-secagg share " + round_key.encode() + encode_ids(sender, recipient)
