"""The masks: pseudo-random ring vectors expanded from 32-byte seeds (AES-256-CTR keystream)."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray

from common.secagg import keys
from common.secagg.params import RoundKey

_ZERO_NONCE = bytes(16)  # each key expands one mask only: it is derived per round and purpose


def expand(key: bytes, *, length: int, bits: int) -> NDArray[np.uint64]:
    """`length` uniform elements of Z_(2**bits) from a 32-byte key."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64)  # (length,)
    return words & np.uint64(2**bits - 1)


def self_mask_key(seed: bytes, *, round_key: RoundKey) -> bytes:
    """The key of a site's self mask PRG(b) in this round."""
    return keys.derive(seed, info=b"fedfusion-secagg self-mask " + round_key.encode())


def pair_mask_key(
    private: X25519PrivateKey,
    peer: X25519PublicKey,
    *,
    round_key: RoundKey,
    node: int,
    other: int,
) -> bytes:
    """The key of the mask `node` and `other` share in this round (the same from either side)."""
    low, high = sorted((node, other))
    info = b"fedfusion-secagg pair-mask " + round_key.encode() + keys.encode_ids(low, high)
    return keys.agree(private, peer, info=info)


def pair_sign(node: int, other: int) -> int:
    """+1 if `node` adds the pair's mask, -1 if it subtracts it: the two cancel in the sum."""
    return 1 if node < other else -1


def add_mask(vector: NDArray[np.uint64], key: bytes, *, sign: int, bits: int) -> NDArray[np.uint64]:
    """`vector` + sign * PRG(key), in Z_(2**bits)."""
    mask = expand(key, length=vector.size, bits=bits)
    # uint64 arithmetic wraps modulo 2**64, a multiple of 2**bits: reduce once at the end
    total = vector + mask if sign > 0 else vector - mask
    return total & np.uint64(2**bits - 1)
