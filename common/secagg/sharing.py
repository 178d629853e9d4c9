"""Shamir secret sharing of 32-byte secrets (Shamir 1979), over GF(2^128) by pycryptodome."""

from __future__ import annotations

from collections.abc import Mapping

from Crypto.Protocol.SecretSharing import Shamir

from common.errors import Failure

SECRET_BYTES = 32  # a self-mask seed or an X25519 private key
SHARE_BYTES = 32  # two 16-byte chunk shares; the x-coordinate is implicit (the holder's position)
_CHUNK = 16


def split(secret: bytes, *, threshold: int, count: int) -> list[bytes]:
    """`count` shares of a 32-byte secret, any `threshold` of which rebuild it; share i is x=i+1."""
    assert len(secret) == SECRET_BYTES, "secrets are 32 bytes"
    shares = [b""] * count
    for start in range(0, SECRET_BYTES, _CHUNK):
        for x, share in Shamir.split(threshold, count, secret[start : start + _CHUNK], ssss=False):
            shares[x - 1] += share
    return shares


def combine(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """The secret from at least `threshold` shares, keyed by x-coordinate."""
    if len(shares) < threshold:
        raise Failure(
            f"{len(shares)} shares of a secret, {threshold} are needed: too many sites dropped "
            "out to recover the sum; run the round again with more sites",
            reason="secagg-dropouts",
        )
    chosen = sorted(shares.items())[:threshold]  # any t points fix a polynomial of degree t - 1
    secret = b""
    for start in range(0, SHARE_BYTES, _CHUNK):
        secret += Shamir.combine([(x, s[start : start + _CHUNK]) for x, s in chosen], ssss=False)
    return secret
