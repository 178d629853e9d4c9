"""The protocol's messages as flat fields a Flower ConfigRecord holds, and back, with bounds.

Node ids travel as 8-byte big-endian blobs (Flower's record integers are signed 64-bit; node ids
are unsigned), byte maps as a blob of ids beside a list of byte strings, the layout as JSON. Every
`*_from_fields` reads untrusted input: a missing, mistyped or oversized field is a
ConfigurationError (reason "message"); the dataclasses then check sizes and ranges themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from common.errors import ConfigurationError
from common.secagg.messages import (
    KeyDirectory,
    PublicKeys,
    Reveal,
    SealedShares,
    ShareDelivery,
    UnmaskRequest,
)
from common.secagg.params import MAX_COHORT, Layout, RoundKey, RoundParams

Fields = dict[str, Any]  # what a ConfigRecord holds: bytes, int, float, str, bool, lists of them
ID_BYTES = 8
MAX_LAYOUT_JSON = 1_000_000  # bytes of the layout's JSON: names and shapes of a model's arrays


def _malformed(what: str) -> ConfigurationError:
    return ConfigurationError(
        f"secure aggregation message: {what}; the sender is faulty or runs another version",
        reason="message",
    )


def _get(fields: Mapping[str, Any], key: str, kind: type) -> Any:
    value = fields.get(key)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _malformed(f"'{key}' must be an integer")
    if not isinstance(value, kind):
        raise _malformed(f"'{key}' must be {kind.__name__}")
    return value


def encode_nodes(nodes: tuple[int, ...]) -> bytes:
    """Node ids as one blob of 8-byte big-endian integers."""
    return b"".join(n.to_bytes(ID_BYTES, "big") for n in nodes)


def decode_nodes(blob: object, what: str) -> tuple[int, ...]:
    """The inverse of `encode_nodes`, for at most a cohort's length of ids."""
    if not isinstance(blob, bytes) or len(blob) % ID_BYTES or len(blob) > ID_BYTES * MAX_COHORT:
        raise _malformed(f"{what} must be at most {MAX_COHORT} ids of {ID_BYTES} bytes each")
    return tuple(
        int.from_bytes(blob[i : i + ID_BYTES], "big") for i in range(0, len(blob), ID_BYTES)
    )


def _blobs(fields: Mapping[str, Any], prefix: str) -> dict[int, bytes]:
    nodes = decode_nodes(fields.get(f"{prefix}-nodes"), f"'{prefix}-nodes'")
    blobs = fields.get(f"{prefix}-blobs")
    if not isinstance(blobs, list) or len(blobs) != len(nodes):
        raise _malformed(f"'{prefix}-blobs' must list one byte string per node")
    if not all(isinstance(b, bytes) for b in blobs) or len(set(nodes)) != len(nodes):
        raise _malformed(f"'{prefix}-blobs' must be byte strings, one per distinct node")
    return dict(zip(nodes, blobs, strict=True))


def _put_blobs(prefix: str, blobs: Mapping[int, bytes]) -> Fields:
    nodes = tuple(sorted(blobs))
    return {f"{prefix}-nodes": encode_nodes(nodes), f"{prefix}-blobs": [blobs[n] for n in nodes]}


def round_key_fields(key: RoundKey) -> Fields:
    """A round key's fields."""
    return {"secagg-run": key.run, "secagg-round": key.round}


def round_key_from_fields(fields: Mapping[str, Any]) -> RoundKey:
    """A round key from untrusted fields (RoundKey checks its bounds)."""
    return RoundKey(run=_get(fields, "secagg-run", str), round=_get(fields, "secagg-round", int))


def params_fields(params: RoundParams) -> Fields:
    """Stage 1 request: the round's public parameters."""
    layout = json.dumps([[name, list(shape)] for name, shape in params.layout.shapes])
    return {
        **round_key_fields(params.round),
        "cohort": encode_nodes(params.cohort),
        "threshold": params.threshold,
        "bits": params.bits,
        "clip": float(params.clip),
        "scale": float(params.scale),
        "noise-bound": params.noise_bound,
        "max-weight": params.max_weight,
        "layout": layout,
    }


def params_from_fields(fields: Mapping[str, Any]) -> RoundParams:
    """Stage 1 request from untrusted fields."""
    text = _get(fields, "layout", str)
    if len(text) > MAX_LAYOUT_JSON:
        raise _malformed(f"the layout is longer than {MAX_LAYOUT_JSON} characters")
    try:
        entries = json.loads(text)
        shapes = tuple((str(name), tuple(shape)) for name, shape in entries)
    except (ValueError, TypeError) as err:
        raise _malformed("the layout must be a JSON list of [name, shape]") from err
    return RoundParams(
        round=round_key_from_fields(fields),
        cohort=decode_nodes(fields.get("cohort"), "'cohort'"),
        threshold=_get(fields, "threshold", int),
        bits=_get(fields, "bits", int),
        clip=_get(fields, "clip", float),
        scale=_get(fields, "scale", float),
        noise_bound=_get(fields, "noise-bound", int),
        max_weight=_get(fields, "max-weight", int),
        layout=Layout(shapes=shapes),
    )


def public_keys_fields(keys: PublicKeys) -> Fields:
    """Stage 1 reply: a site's public keys, its identity and signature."""
    return {
        **round_key_fields(keys.round),
        "node": encode_nodes((keys.node,)),
        "encryption": keys.encryption,
        "masking": keys.masking,
        "identity": keys.identity,
        "signature": keys.signature,
    }


def public_keys_from_fields(fields: Mapping[str, Any]) -> PublicKeys:
    """Stage 1 reply from untrusted fields."""
    node = decode_nodes(fields.get("node"), "'node'")
    if len(node) != 1:
        raise _malformed("'node' must be one id")
    return PublicKeys(
        round=round_key_from_fields(fields),
        node=node[0],
        encryption=_get(fields, "encryption", bytes),
        masking=_get(fields, "masking", bytes),
        identity=_get(fields, "identity", bytes),
        signature=_get(fields, "signature", bytes),
    )


def directory_fields(directory: KeyDirectory) -> Fields:
    """Stage 2 request: every answering site's public keys, as parallel lists."""
    k = directory.keys
    return {
        **round_key_fields(directory.round),
        "keys-nodes": encode_nodes(tuple(p.node for p in k)),
        "keys-encryption": [p.encryption for p in k],
        "keys-masking": [p.masking for p in k],
        "keys-identity": [p.identity for p in k],
        "keys-signature": [p.signature for p in k],
    }


def directory_from_fields(fields: Mapping[str, Any]) -> KeyDirectory:
    """Stage 2 request from untrusted fields."""
    round_key = round_key_from_fields(fields)
    nodes = decode_nodes(fields.get("keys-nodes"), "'keys-nodes'")
    columns = {}
    for name in ("encryption", "masking", "identity", "signature"):
        column = fields.get(f"keys-{name}")
        if not isinstance(column, list) or len(column) != len(nodes):
            raise _malformed(f"'keys-{name}' must list one value per node")
        if not all(isinstance(v, bytes) for v in column):
            raise _malformed(f"'keys-{name}' must hold byte strings")
        columns[name] = column
    keys = tuple(
        PublicKeys(
            round=round_key,
            node=node,
            encryption=columns["encryption"][i],
            masking=columns["masking"][i],
            identity=columns["identity"][i],
            signature=columns["signature"][i],
        )
        for i, node in enumerate(nodes)
    )
    return KeyDirectory(round=round_key, keys=keys)


def sealed_fields(sealed: SealedShares) -> Fields:
    """Stage 2 reply: the sender's sealed share pairs, by recipient."""
    return {
        **round_key_fields(sealed.round),
        "sender": encode_nodes((sealed.sender,)),
        **_put_blobs("sealed", sealed.sealed),
    }


def sealed_from_fields(fields: Mapping[str, Any]) -> SealedShares:
    """Stage 2 reply from untrusted fields."""
    sender = decode_nodes(fields.get("sender"), "'sender'")
    if len(sender) != 1:
        raise _malformed("'sender' must be one id")
    return SealedShares(
        round=round_key_from_fields(fields), sender=sender[0], sealed=_blobs(fields, "sealed")
    )


def delivery_fields(delivery: ShareDelivery) -> Fields:
    """Stage 3 request: the sealed share pairs addressed to one site, by sender."""
    return {
        **round_key_fields(delivery.round),
        "recipient": encode_nodes((delivery.recipient,)),
        **_put_blobs("sealed", delivery.sealed),
    }


def delivery_from_fields(fields: Mapping[str, Any]) -> ShareDelivery:
    """Stage 3 request from untrusted fields."""
    recipient = decode_nodes(fields.get("recipient"), "'recipient'")
    if len(recipient) != 1:
        raise _malformed("'recipient' must be one id")
    return ShareDelivery(
        round=round_key_from_fields(fields), recipient=recipient[0], sealed=_blobs(fields, "sealed")
    )


def unmask_fields(request: UnmaskRequest) -> Fields:
    """Stage 4 request: who dropped, who survived."""
    return {
        **round_key_fields(request.round),
        "dropped": encode_nodes(request.dropped),
        "survivors": encode_nodes(request.survivors),
    }


def unmask_from_fields(fields: Mapping[str, Any]) -> UnmaskRequest:
    """Stage 4 request from untrusted fields."""
    return UnmaskRequest(
        round=round_key_from_fields(fields),
        dropped=decode_nodes(fields.get("dropped"), "'dropped'"),
        survivors=decode_nodes(fields.get("survivors"), "'survivors'"),
    )


def reveal_fields(reveal: Reveal) -> Fields:
    """Stage 4 reply: seed shares of the survivors, key shares of the dropped sites."""
    return {
        **round_key_fields(reveal.round),
        "node": encode_nodes((reveal.node,)),
        **_put_blobs("seed", reveal.seed_shares),
        **_put_blobs("key", reveal.key_shares),
    }


def reveal_from_fields(fields: Mapping[str, Any]) -> Reveal:
    """Stage 4 reply from untrusted fields."""
    node = decode_nodes(fields.get("node"), "'node'")
    if len(node) != 1:
        raise _malformed("'node' must be one id")
    return Reveal(
        round=round_key_from_fields(fields),
        node=node[0],
        seed_shares=_blobs(fields, "seed"),
        key_shares=_blobs(fields, "key"),
    )
