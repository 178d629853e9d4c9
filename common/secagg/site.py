"""One site's side of a SecAgg+ round (Bell et al. 2020; Bonawitz et al. 2017), as a state machine.

The coordinator is untrusted: every request is checked against the round the site expects and
its own rules (minimum cohort, safe threshold, every relayed key signed by a roster member and
one hospital per node, never both shares of one neighbour, at least t survivors, enough honest
noise shares). A refused request aborts the session: it answers nothing afterwards. Between the
round's messages a session lives in the site's memory as `dump()` bytes (versioned JSON).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from numpy.typing import NDArray

from common.errors import ConfigurationError, FedFusionError, Refusal
from common.secagg import keys, masking, sharing
from common.secagg.identity import Roster, Signer, fingerprint
from common.secagg.messages import (
    KeyDirectory,
    MaskedVector,
    PublicKeys,
    Reveal,
    SealedShares,
    ShareDelivery,
    UnmaskRequest,
    signed_statement,
)
from common.secagg.params import Layout, RoundKey, RoundParams, min_safe_threshold
from common.secagg.quantization import to_ring

logger = logging.getLogger(__name__)
T = TypeVar("T")
_FORMAT, _VERSION = "fedfusion-secagg-site", 1  # what `dump` writes; `load` reads only this


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
        signer: Signer,
        roster: Roster,
        noise_shares: int = 0,
    ) -> None:
        if not 0 <= colluders < min_cohort or min_cohort < 2:
            raise ConfigurationError(
                f"min_cohort {min_cohort} must be >= 2 and colluders {colluders} in "
                "[0, min_cohort): with as many colluders as sites nothing is hidden",
                reason="policy",
            )
        if type(noise_shares) is not int or noise_shares < 0:
            raise ConfigurationError(
                f"noise_shares {noise_shares!r} must be an integer >= 0 (0: the site's DP "
                "guarantee needs no other site's noise in the sum)",
                reason="policy",
            )
        if not isinstance(signer, Signer) or not isinstance(roster, Roster):
            raise ConfigurationError(
                "a secure aggregation site needs its identity Signer and the consortium's Roster",
                reason="node-config",
            )
        if signer.public_bytes() not in roster:
            raise ConfigurationError(
                f"this site's identity key {fingerprint(signer.public_bytes())} is not in the "
                "roster: the other sites would refuse its keys; add its public key line to the "
                "roster file (or point the node config at the hospital's registered key)",
                reason="node-config",
            )
        self.node, self.round_key = node, round_key
        self.min_cohort, self.colluders, self.noise_shares = min_cohort, colluders, noise_shares
        self._signer, self._roster = signer, roster
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
        encryption, masking = keys.public_bytes(self._encryption), keys.public_bytes(self._masking)
        statement = signed_statement(
            round_key=self.round_key, node=self.node, encryption=encryption, masking=masking
        )
        return PublicKeys(
            round=self.round_key,
            node=self.node,
            encryption=encryption,
            masking=masking,
            identity=self._signer.public_bytes(),
            signature=self._signer.sign(statement),
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
        if n - self.colluders < self.noise_shares:
            raise _refuse(
                f"a cohort of {n} sites with up to {self.colluders} colluders holds fewer than "
                f"the {self.noise_shares} honest noise shares the site's DP guarantee needs"
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
        if mine is None or (mine.identity, mine.encryption, mine.masking) != (
            self._signer.public_bytes(),
            keys.public_bytes(self._encryption),
            keys.public_bytes(self._masking),
        ):
            raise _refuse("the directory does not hold this site's own public keys unchanged")
        if len(listed) < params.threshold:
            raise _refuse(f"{len(listed)} sites in the directory, fewer than t={params.threshold}")
        # the cohort is the hospitals that signed keys, not the node ids the coordinator named:
        # a coordinator claiming a larger cohort than answered is held to the site's rules here
        if len(listed) < self.min_cohort:
            raise _refuse(
                f"{len(listed)} hospitals signed keys for this round; the site's policy needs "
                f"{self.min_cohort} (the coordinator named {len(params.cohort)})"
            )
        if len(listed) - self.colluders < self.noise_shares:
            raise _refuse(
                f"{len(listed)} hospitals signed keys; with {self.colluders} colluders fewer "
                f"than the {self.noise_shares} honest noise shares the site's noise assumes"
            )
        blobs = [k.encryption for k in directory.keys] + [k.masking for k in directory.keys]
        if len(set(blobs)) != len(blobs):
            raise _refuse("two directory entries share a public key; every key must be fresh")
        self._check_identities(directory)
        return {
            node: _Peer(
                encryption=keys.load_public(k.encryption, owner=node),
                masking=keys.load_public(k.masking, owner=node),
            )
            for node, k in listed.items()
            if node != self.node
        }

    def _check_identities(self, directory: KeyDirectory) -> None:
        """Every entry signed by a roster member, and each member behind one node only."""
        nodes: dict[bytes, list[int]] = {}
        for k in directory.keys:
            nodes.setdefault(k.identity, []).append(k.node)
        twice = [sorted(n) for n in nodes.values() if len(n) > 1]
        if twice:
            # one hospital is one cohort slot: else a coordinator with one accomplice could
            # fill the cohort with it and count it as several honest sites
            raise _refuse(
                f"nodes {twice[0]} carry one hospital's identity key "
                f"{fingerprint(next(i for i, n in nodes.items() if len(n) > 1))}"
            )
        for k in directory.keys:
            try:
                self._roster.verify(k.identity, k.signature, k.statement())
            except Refusal as e:
                raise _refuse(f"the public keys of node {k.node}: {e.detail}") from e

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

    def mask(
        self,
        delivery: ShareDelivery,
        vector: NDArray[np.uint64],
        *,
        noise: NDArray[np.int64] | None = None,
    ) -> MaskedVector:
        """Stage 3: keep the shares sent to this site; return its vector (+ noise), masked."""
        with self._stage(Stage.SHARED, delivery.round, "the share delivery"):
            self._check_noise(noise, self.params)
            self._take_shares(delivery, self.params)
            masked = self._masked(vector, noise, self.params)
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

    @staticmethod
    def _check_noise(noise: NDArray[np.int64] | None, params: RoundParams) -> None:
        if noise is None:
            return
        if (
            not isinstance(noise, np.ndarray)
            or noise.dtype != np.int64
            or noise.shape != (params.layout.length,)
            or np.abs(noise).max(initial=0) > params.noise_bound
        ):
            raise ConfigurationError(
                f"the site's noise must be a vector of {params.layout.length} int64 of "
                f"|value| <= noise_bound {params.noise_bound}; sample it for this round's layout",
                reason="node-config",
            )

    def _masked(
        self,
        vector: NDArray[np.uint64],
        noise: NDArray[np.int64] | None,
        params: RoundParams,
    ) -> NDArray[np.uint64]:
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
        if noise is not None:
            total = (total + to_ring(noise, bits=params.bits)) & np.uint64(params.modulus - 1)
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
        if len(request.survivors) - self.colluders < self.noise_shares:
            raise _refuse(
                f"{len(request.survivors)} survivors with up to {self.colluders} colluders carry "
                f"fewer than the {self.noise_shares} honest noise shares the site's DP guarantee "
                "needs: the dropped sites' noise is missing from the sum"
            )

    def dump(self) -> bytes:
        """The session as versioned JSON, to keep between the round's messages in site memory.

        It holds the round's private keys and the shares this site holds: it must stay in the
        site's memory (never logged, never sent), and replace the previous dump after every
        stage (a session loaded from an older dump could answer a stage twice).
        """
        params = self._params
        state = {
            "format": _FORMAT,
            "version": _VERSION,
            "stage": int(self.stage),
            "node": self.node,
            "round": {"run": self.round_key.run, "round": self.round_key.round},
            "min_cohort": self.min_cohort,
            "colluders": self.colluders,
            "noise_shares": self.noise_shares,
            "identity": _b64(self._signer.public_bytes()),
            "encryption": _b64(keys.private_bytes(self._encryption)),
            "masking": _b64(keys.private_bytes(self._masking)),
            "seed": _b64(self._seed),
            "params": None if params is None else _params_state(params),
            "peers": {
                str(node): [_b64(keys.raw_public(p.encryption)), _b64(keys.raw_public(p.masking))]
                for node, p in self._peers.items()
            },
            "held": {str(owner): [_b64(b), _b64(k)] for owner, (b, k) in self._held.items()},
            "partners": list(self._partners),
        }
        return json.dumps(state, separators=(",", ":")).encode()

    @classmethod
    def load(cls, data: bytes, *, signer: Signer, roster: Roster) -> SiteSession:
        """A session from `dump()`'s bytes; the site's identity key must be the one it ran with."""
        try:
            state = _State(json.loads(data))
            if state.get("format", str) != _FORMAT or state.get("version", int) != _VERSION:
                raise ValueError(f"not a version {_VERSION} {_FORMAT} dump")
            round_state = _State(state.get("round", dict))
            session = cls(
                node=state.get("node", int),
                round_key=RoundKey(
                    run=round_state.get("run", str), round=round_state.get("round", int)
                ),
                min_cohort=state.get("min_cohort", int),
                colluders=state.get("colluders", int),
                noise_shares=state.get("noise_shares", int),
                signer=signer,
                roster=roster,
            )
            if state.blob("identity") != signer.public_bytes():
                raise ValueError("it was made under another identity key than the one given")
            session._restore(state)
        except (ValueError, TypeError, KeyError, FedFusionError) as e:
            detail = e.detail if isinstance(e, FedFusionError) else str(e)
            raise ConfigurationError(
                f"a saved secure aggregation session cannot be loaded ({detail}); it is "
                "corrupt or from another FedFusion version: the site must sit this round out",
                reason="message",
            ) from e
        return session

    def _restore(self, state: _State) -> None:
        stage = Stage(state.get("stage", int))
        self._encryption = keys.load_private(state.blob("encryption", size=keys.KEY_BYTES))
        self._masking = keys.load_private(state.blob("masking", size=keys.KEY_BYTES))
        self._seed = state.blob("seed")
        if len(self._seed) not in (0, sharing.SECRET_BYTES):
            raise ValueError("the self-mask seed must be empty or 32 bytes")
        raw_params = state.get("params", dict, optional=True)
        self._params = None if raw_params is None else _params_from(_State(raw_params))
        if (self._params is None) != (stage is Stage.NEW) and stage is not Stage.ABORTED:
            raise ValueError(f"stage {stage.name} and the round parameters disagree")
        if self._params is not None and self._params.round != self.round_key:
            raise ValueError("the round parameters are for another round than the session")
        if stage in (Stage.SHARED, Stage.MASKED, Stage.REVEALED) and not self._seed:
            raise ValueError(f"stage {stage.name} needs the self-mask seed")
        for text, pair in state.get("peers", dict).items():
            node = _node(text)
            encryption, masking_key = _pair(pair, size=keys.KEY_BYTES)
            self._peers[node] = _Peer(
                encryption=keys.load_public(encryption, owner=node),
                masking=keys.load_public(masking_key, owner=node),
            )
        for text, pair in state.get("held", dict).items():
            owner = _node(text)
            self._held[owner] = _pair(pair, size=sharing.SHARE_BYTES)
        partners = state.get("partners", list)
        if not all(type(n) is int for n in partners) or not set(partners) <= set(self._peers):
            raise ValueError("the masking partners must be node ids of the stage 2 peers")
        self._partners = tuple(partners)
        self.stage = stage


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


class _State:
    """A JSON object of a dump, read field by field with its type checked."""

    def __init__(self, raw: object) -> None:
        if not isinstance(raw, dict):
            raise TypeError("a JSON object was expected")
        self._raw: dict[str, object] = raw

    def get(self, name: str, kind: type[T], *, optional: bool = False) -> T:
        if name not in self._raw:
            raise ValueError(f"field {name!r} is missing")
        value = self._raw[name]
        if value is None and optional:
            return value  # type: ignore[return-value]  # the caller asked for an optional field
        # bool is an int subclass in Python: a JSON true is not a number here
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"field {name!r} must be {kind.__name__}")
        return value

    def number(self, name: str) -> float:
        value = self._raw.get(name)
        if type(value) not in (int, float):
            raise TypeError(f"field {name!r} must be a number")
        return value  # type: ignore[return-value]  # checked just above

    def blob(self, name: str, *, size: int | None = None) -> bytes:
        return _blob(self.get(name, str), size=size, what=name)


def _blob(text: object, *, size: int | None = None, what: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be base64 text")
    try:
        blob = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"{what} is not base64") from e
    if size is not None and len(blob) != size:
        raise ValueError(f"{what} must be {size} bytes")
    return blob


def _pair(pair: object, *, size: int) -> tuple[bytes, bytes]:
    if not isinstance(pair, list) or len(pair) != 2:
        raise TypeError("a pair of base64 strings was expected")
    return _blob(pair[0], size=size, what="a key or share"), _blob(
        pair[1], size=size, what="a key or share"
    )


def _node(text: str) -> int:
    if not text.isdecimal():
        raise ValueError(f"node id {text!r} is not a decimal integer")
    return int(text)


def _params_state(params: RoundParams) -> dict[str, object]:
    return {
        "round": {"run": params.round.run, "round": params.round.round},
        "cohort": list(params.cohort),
        "threshold": params.threshold,
        "bits": params.bits,
        "clip": params.clip,
        "scale": params.scale,
        "noise_bound": params.noise_bound,
        "max_weight": params.max_weight,
        "layout": [[name, list(shape)] for name, shape in params.layout.shapes],
    }


def _params_from(state: _State) -> RoundParams:
    round_state = _State(state.get("round", dict))
    layout = state.get("layout", list)
    if not all(isinstance(e, list) and len(e) == 2 and isinstance(e[1], list) for e in layout):
        raise TypeError("the layout must be a list of [name, shape]")
    return RoundParams(
        round=RoundKey(run=round_state.get("run", str), round=round_state.get("round", int)),
        cohort=tuple(state.get("cohort", list)),
        threshold=state.get("threshold", int),
        bits=state.get("bits", int),
        clip=state.number("clip"),
        scale=state.number("scale"),
        noise_bound=state.get("noise_bound", int),
        max_weight=state.get("max_weight", int),
        layout=Layout(shapes=tuple((name, tuple(shape)) for name, shape in layout)),
    )
