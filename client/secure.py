"""A hospital's side of a secure-aggregation round: four stages, one DP-SGD step, its charge.

Plain functions (no Flower) called by the ClientApp's `train.secagg-*` handlers. The site's
session (`common.secagg.site.SiteSession`: its private keys, seed and the shares it holds) lives
between the stages in the node's own memory (Flower's Context.state), never in a message.

Each round is **one** DP-SGD step (distributed DP needs the coordinator to see only the sum of
one noisy quantity per site; several local steps would each depend on the site's own noisy
model, and the sum's noise would not bound them): the site Poisson-samples its training rows at
its account's rate, sums their clipped per-sample gradients, quantizes the sum, adds its share
of discrete Gaussian noise and masks it (`common.privacy.distributed`). The sum the coordinator
unmasks then carries noise of multiplier z whenever at least `noise-shares` honest sites
survive, which each site checks before it reveals anything (`SiteSession`). The site's account
is charged at z (what the sum carries under that assumption); its receipt also records the
fallback epsilon of its own share alone (z / sqrt(noise-shares)), which holds without it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.rounds import (
    RoundRequest,
    _training_net,
    check_fingerprint,
    check_request,
    load_global,
    log_spend,
    open_books,
    site_policy,
    site_terms,
)
from client.site_config import SiteConfig
from client.state import SiteState
from common.config import RunConfig
from common.errors import ConfigurationError, Refusal
from common.model.modalities import frozen, untrained_parameters
from common.privacy.accounting import MAX_NOISE_MULTIPLIER, Account
from common.privacy.books import SecureStep
from common.privacy.distributed import (
    DistributedNoise,
    clipped_gradient_sum,
)
from common.privacy.enforcement import LocalPlan, PrivacyTerms
from common.privacy.ledger import exclusive
from common.privacy.policy import SitePolicy
from common.privacy.receipts import Receipt
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
from common.secagg.noise import secure_generator
from common.secagg.params import RoundKey, RoundParams
from common.secagg.site import SiteSession
from common.secagg.vector import pack
from common.training.loop import pick_device

log = logging.getLogger(__name__)

SIMULATED_IDENTITY = b"fedfusion simulated hospital identity "  # the researcher plays every site


@dataclass(frozen=True, kw_only=True)
class SecureTerms:
    """What stage 1 asks beyond the protocol's parameters: the clipping norm and noise split."""

    max_grad_norm: float  # C: the run's, which the round's integer sensitivity is computed from
    noise_shares: int  # d: the honest shares the sum's noise is split into


@dataclass(frozen=True, kw_only=True)
class SiteOffer:
    """Stage 1 at a site: its public keys, and the noise multiplier its budget needs."""

    keys: PublicKeys
    noise_multiplier: float  # sigma_j: the least z at which the run's rounds fit its caps
    sample_rate: float  # q_j: its Poisson sampling rate
    session: bytes


@dataclass(frozen=True, kw_only=True)
class MaskedOutcome:
    """Stage 3 at a site: its masked vector and what it was charged for it."""

    masked: MaskedVector
    session: bytes
    num_examples: int
    account: Account | None
    receipt: Receipt
    terms: PrivacyTerms
    seconds: float


def identity(site: SiteConfig) -> tuple[Signer, Roster]:
    """The site's signing key and the consortium's roster (node config), or a simulation's."""
    if site.simulated:
        return _simulated_identity(site)
    if site.secagg_identity is None or site.secagg_roster is None:
        raise ConfigurationError(
            "secure aggregation needs the node's identity key and the consortium's roster: set "
            "secagg-identity='/path/supernode.key' (the SuperNode's authentication key) and "
            "secagg-roster='/path/roster.pub' (every hospital's public key, one per line) in "
            "--node-config",
            reason="node-config",
        )
    return Signer.load(site.secagg_identity), Roster.load(site.secagg_roster)


def _simulated_identity(site: SiteConfig) -> tuple[Signer, Roster]:
    """Identities derived from each simulated hospital's folder name: the researcher, who plays
    every hospital, holds them all; the roster is every hospital folder under the data root."""
    folders = sorted(p.name for p in Path(site.manifest).parent.glob("hospital-*") if p.is_dir())

    def signer(name: str) -> Signer:
        seed = hashlib.sha256(SIMULATED_IDENTITY + name.encode()).digest()
        return Signer(Ed25519PrivateKey.from_private_bytes(seed))

    roster = Roster.of([signer(name).public_bytes() for name in folders])
    return signer(Path(site.manifest).name), roster


def refuse_unless_allowed(policy: SitePolicy) -> None:
    """A site whose policy says `secure-aggregation = "off"` takes part in no secure round."""
    if policy.secure_aggregation == "off":
        raise Refusal(
            "the site's policy keeps it out of secure aggregation (secure-aggregation = "
            '"off"); set it to "allow" to take part',
            reason="secagg-unsafe",
        )
    if policy.evaluate_only:
        raise Refusal(
            "this site only evaluates the federation's model (evaluate-only = true in its "
            "policy): it never trains.",
            reason="evaluate-only",
        )


def secure_plan(run: RunConfig, num_examples: int) -> LocalPlan:
    """A secure round is one DP-SGD step at the run's batch: the account's plan."""
    return LocalPlan(
        num_examples=num_examples, batch_size=run.train.batch_size, epochs=1, steps_per_round=1
    )


def _session(state: SiteState, blob: bytes, round_key: RoundKey) -> SiteSession:
    signer, roster = identity(state.site)
    session = SiteSession.load(blob, signer=signer, roster=roster)
    if session.round_key != round_key:
        raise Refusal(
            f"the stage is for {round_key}, the site's open session for {session.round_key}: a "
            "secure round runs its four stages in order",
            reason="secagg-unsafe",
        )
    return session


def offer_keys(
    state: SiteState,
    run: RunConfig,
    request: RoundRequest,
    params: RoundParams,
    secure: SecureTerms,
    *,
    node: int,
) -> SiteOffer:
    """Stage 1: check the round against the site's policy; its keys and the noise it needs."""
    policy = site_policy(state.site, run)
    refuse_unless_allowed(policy)
    check_request(policy, run, request)
    _check_round_key(params.round, request)
    with state.lock:
        data = state.data(run)
        terms = site_terms(policy, run, data)
        if secure.max_grad_norm > terms.max_grad_norm:
            raise Refusal(
                f"the round clips at {secure.max_grad_norm:g}, above this site's bound of "
                f"{terms.max_grad_norm:g} (its policy's max-max-grad-norm): the sum's noise "
                "would be calibrated to a larger sensitivity than the site allows",
                reason="secagg-unsafe",
            )
        with exclusive(state.site.state_dir):
            books = open_books(state.site, request, data, terms)
            if books.trained:
                raise _trained_already(request)
            account = books.authorize_training(policy, secure_plan(run, len(data.train)))
    signer, roster = identity(state.site)
    session = SiteSession(
        node=node,
        round_key=params.round,
        min_cohort=policy.min_secagg_sites,
        colluders=policy.secagg_colluders,
        noise_shares=secure.noise_shares if account is not None else 0,
        signer=signer,
        roster=roster,
    )
    keys = session.advertise(params)
    return SiteOffer(
        keys=keys,
        noise_multiplier=account.noise_multiplier if account else 0.0,
        sample_rate=account.sample_rate if account else 1.0,
        session=session.dump(),
    )


def share_secrets(
    state: SiteState,
    request: RoundRequest,
    directory: KeyDirectory,
    *,
    noise_multiplier: float,
    session: bytes,
) -> tuple[SealedShares, bytes]:
    """Stage 2: check the directory (signatures, one slot per hospital); seal its shares."""
    site = _session(state, session, _round_key(request))
    if not (math.isfinite(noise_multiplier) and 0.0 <= noise_multiplier <= MAX_NOISE_MULTIPLIER):
        raise ConfigurationError(
            f"the round's noise multiplier {noise_multiplier!r} is not in [0, "
            f"{MAX_NOISE_MULTIPLIER:g}]",
            reason="message",
        )
    return site.share(directory), site.dump()


def mask_update(
    state: SiteState,
    run: RunConfig,
    request: RoundRequest,
    delivery: ShareDelivery,
    secure: SecureTerms,
    *,
    noise_multiplier: float,
    session: bytes,
) -> MaskedOutcome:
    """Stage 3: one DP-SGD step's clipped gradient sum, quantized, noised, masked, charged.

    `noise_multiplier`: z, as the site accepted it at stage 2.
    """
    z = noise_multiplier
    site = _session(state, session, _round_key(request))
    policy = site_policy(state.site, run)
    refuse_unless_allowed(policy)
    check_request(policy, run, request)
    params = site.params
    with state.lock:
        bundle, data = state.bundle(run.model), state.data(run)
        check_fingerprint(bundle, request.frozen_fingerprint)
        terms = site_terms(policy, run, data)
        with exclusive(state.site.state_dir):
            books = open_books(state.site, request, data, terms)
            if books.trained:
                raise _trained_already(request)
            planned = books.authorize_training(policy, secure_plan(run, len(data.train)))
            if planned is not None and z < planned.noise_multiplier:
                raise Refusal(
                    f"the round's noise multiplier {z:g} is below the {planned.noise_multiplier:g} "
                    "this site's budget needs for the run's rounds: its share would be too small",
                    reason="secagg-unsafe",
                )
            rate = planned.sample_rate if planned else 1.0
            update, seconds = _gradient_sum(state, run, request, rate, secure.max_grad_norm)
            weight = max(1, round(rate * len(data.train)))  # the expected batch, public
            vector = pack(update, weight=weight, params=params, rng=secure_generator())
            noise = _noise(params, secure, z) if planned is not None else None
            masked = site.mask(delivery, vector, noise=noise)
            account = (
                replace(planned, noise_multiplier=z).after([*planned.history, (z, rate, 1)])
                if planned is not None
                else None
            )
            receipt = books.charge_training(
                account,
                sent_sha256=hashlib.sha256(masked.vector.tobytes()).hexdigest(),
                secure=books_secure(params, secure, policy, z),
            )
    log_spend(state.site.site_name, request, receipt, terms, before=_before(planned))
    return MaskedOutcome(
        masked=masked,
        session=site.dump(),
        num_examples=len(data.train),
        account=account,
        receipt=receipt,
        terms=terms,
        seconds=seconds,
    )


def reveal_shares(
    state: SiteState, request: RoundRequest, unmask: UnmaskRequest, *, session: bytes
) -> Reveal:
    """Stage 4: the shares that unmask the survivors' sum, if the site's rules allow it."""
    return _session(state, session, _round_key(request)).reveal(unmask)


def books_secure(
    params: RoundParams, secure: SecureTerms, policy: SitePolicy, z: float
) -> SecureStep:
    """What the ledger keeps of a secure round: cohort, noise shares, colluders, own-share z."""
    return SecureStep(
        cohort=len(params.cohort),
        noise_shares=secure.noise_shares,
        colluders=policy.secagg_colluders,
        own_noise_multiplier=z / math.sqrt(secure.noise_shares) if secure.noise_shares else 0.0,
    )


def _gradient_sum(
    state: SiteState, run: RunConfig, request: RoundRequest, rate: float, max_grad_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """The clipped per-sample gradients of a Poisson sample, summed (arrays trained only)."""
    bundle, data = state.bundle(run.model), state.data(run)
    device = pick_device(state.site.device)
    model = load_global(bundle, request.parameters, device)
    untrained = tuple(untrained_parameters(bundle.model, data.train_combos))
    with frozen(model, untrained):
        net, rows = _training_net(state, run, bundle, data, model, device)
        torch.seed()  # the sample must be secret: reseed from the operating system's entropy
        start = time.perf_counter()
        result = clipped_gradient_sum(
            net,
            rows,
            sample_rate=rate,
            max_grad_norm=max_grad_norm,
            device=device,
            grad_sample_mode=run.privacy.grad_sample_mode,
        )
    sums = {name: t.detach().cpu().double().numpy() for name, t in result.sums.items()}
    return {n: a for n, a in sums.items() if n not in untrained}, time.perf_counter() - start


def _noise(params: RoundParams, secure: SecureTerms, z: float) -> np.ndarray:
    """The site's share of the noise: on the update's coordinates, none on indicators/weight."""
    layout = params.layout
    distributed = DistributedNoise(
        noise_multiplier=z,
        shares=secure.noise_shares,
        max_grad_norm=secure.max_grad_norm,
        scale=params.scale,
        coordinates=layout.coordinates,
    )
    noise = np.zeros(layout.length, dtype=np.int64)
    if z > 0:
        noise[: layout.coordinates] = distributed.sample(layout.coordinates, secure_generator())
    return noise


def _before(account: Account | None) -> float:
    return account.epsilon if account is not None else 0.0


def _trained_already(request: RoundRequest) -> Refusal:
    return Refusal(
        f"round {request.server_round} of run {request.run_key} is already trained and charged "
        "at this site: a secure round's masked vector cannot be sent again",
        reason="secagg-unsafe",
    )


def _round_key(request: RoundRequest) -> RoundKey:
    """The protocol's round: the run key (stable when a run resumes; the site's books refuse a
    round it already trained, in any Flower run) and the round number."""
    return RoundKey(run=request.run_key, round=request.server_round)


def _check_round_key(key: RoundKey, request: RoundRequest) -> None:
    if key != _round_key(request):
        raise Refusal(
            f"the secure round's key {key} is not this message's run and round "
            f"({_round_key(request)})",
            reason="secagg-unsafe",
        )
