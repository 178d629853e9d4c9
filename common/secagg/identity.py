"""Who sent a public key: each hospital signs its round keys with its identity key, and a site
accepts only keys signed by a member of the consortium's roster.

The identity key is the hospital's SuperNode authentication key (EC P-384 in OpenSSH format, as
`common/certs.py` makes it; PEM EC and Ed25519 keys are accepted too). The roster is the file of
the consortium's public keys, one OpenSSH public key line per hospital: the same lines the
SuperLink registers with `flwr supernode register`. An identity travels as the key's OpenSSH
wire encoding (the base64 field of its public key line, decoded), so it is canonical and its
SHA-256 fingerprint is the one `ssh-keygen -l` prints.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from common.errors import ConfigurationError, Refusal

MAX_IDENTITY_BYTES = 256  # an OpenSSH public key blob: Ed25519 51, P-256 104, P-384 136, P-521 172
MAX_SIGNATURE_BYTES = 256  # Ed25519 64; ECDSA r || s: P-256 64, P-384 96, P-521 132
MAX_ROSTER_BYTES = 10_000_000  # far above any consortium's roster
Algorithm = Literal["ed25519", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521"]
IdentityPrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey
IdentityPublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey

# the curves OpenSSH names, and the hash its ECDSA uses with each (RFC 5656, section 6.2.1)
_CURVES: dict[str, tuple[type[ec.EllipticCurve], hashes.HashAlgorithm]] = {
    "secp256r1": (ec.SECP256R1, hashes.SHA256()),
    "secp384r1": (ec.SECP384R1, hashes.SHA384()),
    "secp521r1": (ec.SECP521R1, hashes.SHA512()),
}
_GENERATE: dict[str, type[ec.EllipticCurve]] = {
    "ecdsa-p256": ec.SECP256R1,
    "ecdsa-p384": ec.SECP384R1,
    "ecdsa-p521": ec.SECP521R1,
}


def _unsupported(key: object) -> str | None:
    """Why a key cannot be an identity key, or None if it can."""
    if isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name in _CURVES:
            return None
        return f"an EC key on curve {key.curve.name} (use P-256, P-384 or P-521)"
    return f"a {type(key).__name__.removeprefix('_')} (use an EC P-384 or Ed25519 key)"


def _wire(public: IdentityPublicKey) -> bytes:
    """The key's OpenSSH wire encoding: the decoded base64 field of its public key line."""
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return base64.b64decode(line.split()[1])


def fingerprint(identity: bytes) -> str:
    """The identity's SHA-256 fingerprint as `ssh-keygen -l` prints it, for logs and errors."""
    digest = base64.b64encode(hashlib.sha256(identity).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _scalar_bytes(curve: ec.EllipticCurve) -> int:
    return (curve.key_size + 7) // 8


class Signer:
    """A hospital's private identity key: it signs the site's public keys of each round."""

    def __init__(self, key: IdentityPrivateKey) -> None:
        problem = _unsupported(key)
        if problem is not None:
            raise ConfigurationError(f"an identity key must not be {problem}", reason="node-config")
        self._key = key
        self._identity = _wire(key.public_key())

    @classmethod
    def load(cls, path: str | Path) -> Signer:
        """The key in a file: an unencrypted OpenSSH or PEM private key (EC or Ed25519)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigurationError(
                f"the identity key {path} cannot be read ({e.strerror}); point the node config "
                "at the SuperNode's authentication private key",
                reason="node-config",
            ) from e
        try:
            key: object
            if b"BEGIN OPENSSH PRIVATE KEY" in data:
                key = serialization.load_ssh_private_key(data, password=None)
            else:
                key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ConfigurationError(
                f"the identity key {path} is not an unencrypted OpenSSH or PEM private key ({e}); "
                "use the SuperNode's authentication private key (fedfusion certs makes one)",
                reason="node-config",
            ) from e
        problem = _unsupported(key)
        if problem is not None:
            raise ConfigurationError(f"the identity key {path} is {problem}", reason="node-config")
        assert isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
        return cls(key)

    @classmethod
    def generate(cls, *, algorithm: Algorithm = "ed25519") -> Signer:
        """A fresh identity key (tests and simulations; a deployment loads the SuperNode's)."""
        if algorithm == "ed25519":
            return cls(Ed25519PrivateKey.generate())
        return cls(ec.generate_private_key(_GENERATE[algorithm]()))

    def public_bytes(self) -> bytes:
        """The identity: the public key's OpenSSH wire encoding (canonical, as in a roster)."""
        return self._identity

    def openssh_public_key(self) -> bytes:
        """The public key as one OpenSSH line (no comment), as a roster file lists it."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )

    def sign(self, data: bytes) -> bytes:
        """A signature of `data`: Ed25519 (64 bytes), or ECDSA as fixed-size r || s."""
        if isinstance(self._key, Ed25519PrivateKey):
            return self._key.sign(data)
        _, digest = _CURVES[self._key.curve.name]
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(digest)))
        size = _scalar_bytes(self._key.curve)
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _untrusted(what: str) -> Refusal:
    return Refusal(
        f"{what}; only keys signed by a hospital of the site's roster are accepted, so the "
        "coordinator relayed a forged or altered key (or the roster misses a member: update it)",
        reason="secagg-unsafe",
    )


def _from_wire(identity: bytes) -> IdentityPublicKey:
    """A public key from its OpenSSH wire encoding; ValueError if it is not one we accept."""
    if len(identity) < 4:
        raise ValueError("too short for an OpenSSH public key")
    size = int.from_bytes(identity[:4], "big")
    name = identity[4 : 4 + size]
    if not name.isascii() or not name.replace(b"-", b"").isalnum():
        raise ValueError("not an OpenSSH public key")
    key = serialization.load_ssh_public_key(name + b" " + base64.b64encode(identity))
    problem = _unsupported(key)
    if problem is not None:
        raise ValueError(f"an identity key must not be {problem}")
    assert isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey)
    if _wire(key) != identity:
        raise ValueError("not in the canonical OpenSSH encoding")
    return key


class Roster:
    """The consortium's public identity keys: whose signed public keys a site accepts."""

    def __init__(self, members: dict[bytes, IdentityPublicKey]) -> None:
        if not members:
            raise ConfigurationError(
                "the identity roster is empty: list the public key of every hospital of the "
                "consortium, one OpenSSH line each",
                reason="node-config",
            )
        self._members = dict(members)

    @classmethod
    def of(cls, keys: Iterable[bytes]) -> Roster:
        """A roster of identities (`Signer.public_bytes()`), for tests and simulations."""
        members: dict[bytes, IdentityPublicKey] = {}
        for identity in keys:
            try:
                members[identity] = _from_wire(identity)
            except (ValueError, UnsupportedAlgorithm) as e:
                raise ConfigurationError(
                    f"a roster identity is not an OpenSSH EC or Ed25519 public key ({e})",
                    reason="node-config",
                ) from e
        return cls(members)

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        """The roster in a file: one OpenSSH public key line per hospital; blank lines and
        `#` comments allowed."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_ROSTER_BYTES:
                raise ConfigurationError(
                    f"the identity roster {path} is larger than {MAX_ROSTER_BYTES} bytes; it "
                    "holds one public key line per hospital",
                    reason="node-config",
                )
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigurationError(
                f"the identity roster {path} cannot be read as UTF-8 text ({e}); point the node "
                "config at the consortium's file of SuperNode public keys",
                reason="node-config",
            ) from e
        members: dict[bytes, IdentityPublicKey] = {}
        first_seen: dict[bytes, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"the identity roster {path}, line {number}"
            try:
                key = serialization.load_ssh_public_key(line.encode())
            except (ValueError, UnsupportedAlgorithm) as e:
                raise ConfigurationError(
                    f"{where}: not an OpenSSH public key line ({e}); each line is "
                    "'<type> <base64> [comment]', as in the SuperNode's .pub file",
                    reason="node-config",
                ) from e
            problem = _unsupported(key)
            if problem is not None:
                raise ConfigurationError(f"{where}: the key is {problem}", reason="node-config")
            assert isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey)
            identity = _wire(key)
            if identity in first_seen:
                raise ConfigurationError(
                    f"{where}: repeats the key of line {first_seen[identity]}; each hospital "
                    "has its own key, listed once",
                    reason="node-config",
                )
            first_seen[identity], members[identity] = number, key
        if not members:
            raise ConfigurationError(
                f"the identity roster {path} lists no public key: list every hospital's, one "
                "OpenSSH line each",
                reason="node-config",
            )
        return cls(members)

    def __contains__(self, identity: object) -> bool:
        return identity in self._members

    def __len__(self) -> int:
        return len(self._members)

    def verify(self, identity_bytes: bytes, signature: bytes, data: bytes) -> None:
        """Accept `signature` of `data` by the roster member `identity_bytes`, or refuse."""
        key = self._members.get(identity_bytes)
        if key is None:
            raise _untrusted(f"identity {fingerprint(identity_bytes)} is not in the roster")
        try:
            if isinstance(key, Ed25519PublicKey):
                key.verify(signature, data)
                return
            _, digest = _CURVES[key.curve.name]
            size = _scalar_bytes(key.curve)
            if len(signature) != 2 * size:
                raise InvalidSignature
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(digest))
        except InvalidSignature as e:
            raise _untrusted(
                f"the signature by {fingerprint(identity_bytes)} does not match the keys it "
                "claims to sign (their round, node or key bytes were changed)"
            ) from e
