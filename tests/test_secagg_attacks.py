"""The coordinator as the attacker: every rule a SiteSession keeps, tested as the attack on it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from common.errors import ConfigurationError, Refusal
from common.secagg import keys, masking, sharing
from common.secagg.coordinator import CoordinatorSession
from common.secagg.identity import Roster, Signer
from common.secagg.messages import (
    KeyDirectory,
    PublicKeys,
    Reveal,
    ShareDelivery,
    UnmaskRequest,
)
from common.secagg.params import RoundKey
from common.secagg.site import SiteSession, Stage
from tests.secagg_helpers import (
    ROUND,
    Transcript,
    make_params,
    make_site,
    make_sites,
    random_vectors,
    run_to_masked,
    signer_for,
)

VICTIM = 101


def _refused(match: str) -> pytest.RaisesExc[Refusal]:
    return pytest.raises(Refusal, match=match)


def _stage2(n: int, t: int) -> tuple[dict[int, SiteSession], KeyDirectory]:
    params = make_params(n, t)
    sites = make_sites(params)
    directory = CoordinatorSession(params).collect_keys(s.advertise(params) for s in sites.values())
    return sites, directory


def _public(directory: KeyDirectory, node: int) -> PublicKeys:
    return next(k for k in directory.keys if k.node == node)


def _unmasked_guess(
    masked: NDArray[np.uint64],
    *,
    seed: bytes,
    bits: int,
    pair_keys: dict[int, tuple[X25519PrivateKey, bytes]] | None = None,
) -> NDArray[np.uint64]:
    """What a coordinator computes from the victim's masked vector with the secrets it rebuilt:
    its self-mask seed, and the masking keys of some partners (node -> (their private key, the
    victim's public masking key))."""
    key = masking.self_mask_key(seed, round_key=ROUND)
    guess = masking.add_mask(masked, key, sign=-1, bits=bits)
    for node, (private, victim_public) in (pair_keys or {}).items():
        peer = keys.load_public(victim_public, owner=VICTIM)
        pair = masking.pair_mask_key(private, peer, round_key=ROUND, node=node, other=VICTIM)
        guess = masking.add_mask(guess, pair, sign=-masking.pair_sign(VICTIM, node), bits=bits)
    return guess


def _combine(shares: dict[int, bytes]) -> bytes:
    return sharing.combine(shares, threshold=len(shares))


def _no_stage4_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """A naive site: one that answers any stage 4 request (the control for the attacks)."""
    monkeypatch.setattr(SiteSession, "_check_unmask", lambda self, request, params: None)


# --- stage 1: the round's parameters -----------------------------------------------------------


def test_a_cohort_below_the_sites_minimum_is_refused() -> None:
    params = make_params(3, 3)
    site = make_site(101, min_cohort=5)
    with _refused("the site's policy needs 5"):
        site.advertise(params)
    assert site.stage is Stage.ABORTED


@pytest.mark.parametrize(
    ("n", "t", "colluders", "safe"),
    [(6, 3, 0, False), (6, 4, 0, True), (6, 4, 2, False), (6, 5, 2, True), (5, 3, 0, True)],
)
def test_a_threshold_below_half_the_cohort_plus_colluders_is_refused(
    n: int, t: int, colluders: int, safe: bool
) -> None:
    params = make_params(n, t)
    site = make_site(101, colluders=colluders)
    if safe:
        site.advertise(params)
    else:
        with _refused("t > \\(n \\+ colluders\\) / 2"):
            site.advertise(params)


def test_a_site_not_in_the_cohort_refuses() -> None:
    site = make_site(999)
    with _refused("not in the round's cohort"):
        site.advertise(make_params(4, 3))


def test_a_policy_with_as_many_colluders_as_sites_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="colluders"):
        make_site(101, colluders=3)


# --- order and rounds --------------------------------------------------------------------------


def test_a_stage_out_of_order_is_refused_and_aborts_the_session() -> None:
    sites, directory = _stage2(4, 3)
    site = sites[101]
    with _refused("after stage KEYS, not SHARED"):
        site.mask(ShareDelivery(round=ROUND, recipient=101, sealed={}), np.zeros(1, np.uint64))
    with _refused("after stage ABORTED"):
        site.share(directory)  # the right request, too late: the session answers nothing more


def test_a_stage_asked_twice_is_refused() -> None:
    sites, directory = _stage2(4, 3)
    sites[101].share(directory)
    with _refused("after stage SHARED, not KEYS"):
        sites[101].share(directory)  # a second sharing would hand out a second polynomial


def test_messages_of_another_round_are_refused() -> None:
    sites, directory = _stage2(4, 3)
    replayed = dataclasses.replace(directory, round=RoundKey(run="run-a", round=2))
    with _refused("is for RoundKey"):
        sites[101].share(replayed)
    params = make_params(4, 3, round_key=RoundKey(run="run-b", round=3))
    with _refused("this session is for"):
        make_site(101).advertise(params)


def test_shares_replayed_from_an_earlier_round_do_not_decrypt() -> None:
    """Round 3's sealed shares, relabelled as round 4's, are refused at the recipient."""
    old_params = make_params(4, 3)
    old_sites = make_sites(old_params)
    old = CoordinatorSession(old_params)
    old_directory = old.collect_keys(s.advertise(old_params) for s in old_sites.values())
    old_deliveries = old.collect_shares(s.share(old_directory) for s in old_sites.values())

    new_round = RoundKey(run="run-a", round=4)
    params = make_params(4, 3, round_key=new_round)
    sites = {n: make_site(n, round_key=new_round) for n in params.cohort}
    directory = CoordinatorSession(params).collect_keys(s.advertise(params) for s in sites.values())
    for s in sites.values():
        s.share(directory)
    replay = dataclasses.replace(old_deliveries[101], round=new_round)
    with _refused("does not decrypt"):
        sites[101].mask(replay, random_vectors(params)[101])


# --- stage 2: the key directory ----------------------------------------------------------------


def _signed(
    entry: PublicKeys, *, signer: Signer | None = None, **changes: bytes | int | RoundKey
) -> PublicKeys:
    """`entry` with `changes`, signed again by `signer` (by default the hospital behind its
    node: a roster member colluding with the coordinator)."""
    changed = dataclasses.replace(entry, **changes)  # type: ignore[arg-type]
    signer = signer or signer_for(changed.node)
    return dataclasses.replace(
        changed, identity=signer.public_bytes(), signature=signer.sign(changed.statement())
    )


def test_keys_of_the_wrong_size_or_type_are_malformed() -> None:
    good = {"round": ROUND, "node": 1, "identity": b"\x03" * 51, "signature": b"\x04" * 64}
    for bad in (b"\x01" * 31, b"\x01" * 33, "a" * 32):
        with pytest.raises(ConfigurationError, match="32 bytes"):
            PublicKeys(encryption=bad, masking=b"\x02" * 32, **good)  # type: ignore[arg-type]
    keys32 = {"encryption": b"\x01" * 32, "masking": b"\x02" * 32}
    for name, bad in (("identity", b""), ("identity", b"\x03" * 257), ("signature", "a")):
        with pytest.raises(ConfigurationError, match=f"{name} must be 1 to 256 bytes"):
            PublicKeys(**{**good, **keys32, name: bad})  # type: ignore[arg-type]


def test_keys_for_nodes_outside_the_cohort_are_refused() -> None:
    """A coordinator cannot enlarge the cohort after stage 1, even with a roster member's keys."""
    sites, directory = _stage2(4, 3)
    sybil = _signed(
        directory.keys[-1],
        node=999,
        encryption=keys.public_bytes(X25519PrivateKey.generate()),
        masking=keys.public_bytes(X25519PrivateKey.generate()),
    )
    with _refused("outside the cohort fixed at stage 1"):
        sites[101].share(dataclasses.replace(directory, keys=(*directory.keys, sybil)))


def test_a_directory_that_swaps_the_sites_own_keys_is_refused() -> None:
    sites, directory = _stage2(4, 3)
    mine = next(k for k in directory.keys if k.node == 101)
    swapped = dataclasses.replace(mine, encryption=keys.public_bytes(X25519PrivateKey.generate()))
    others = tuple(k for k in directory.keys if k.node != 101)
    with _refused("own public keys unchanged"):
        sites[101].share(dataclasses.replace(directory, keys=(swapped, *others)))


def test_a_directory_reusing_one_key_for_two_nodes_is_refused() -> None:
    sites, directory = _stage2(4, 3)
    a, b, c, d = directory.keys
    clone = _signed(d, encryption=c.encryption)  # a colluding member copies 103's key
    with _refused("share a public key"):
        sites[101].share(dataclasses.replace(directory, keys=(a, b, c, clone)))


def test_public_keys_replayed_from_another_round_are_refused() -> None:
    sites, directory = _stage2(4, 3)
    a, b, c, d = directory.keys
    old = dataclasses.replace(d, round=RoundKey(run="run-a", round=2))
    with _refused("public keys of another round"):
        sites[101].share(dataclasses.replace(directory, keys=(a, b, c, old)))


def test_a_low_order_public_key_is_refused() -> None:
    """An all-zero X25519 key would make the shared secret public: the share would be readable."""
    sites, directory = _stage2(4, 3)
    a, b, c, d = directory.keys
    zero = _signed(d, encryption=bytes(32))  # signed by a colluding member: still refused
    with _refused("low-order point"):
        sites[101].share(dataclasses.replace(directory, keys=(a, b, c, zero)))


def test_a_directory_with_fewer_than_t_sites_is_refused() -> None:
    sites, directory = _stage2(5, 3)
    with _refused("fewer than t=3"):
        sites[101].share(dataclasses.replace(directory, keys=directory.keys[:2]))


def test_a_cohort_named_larger_than_the_hospitals_that_signed_is_refused() -> None:
    """The coordinator names 5 nodes (the site's policy needs 4) but only 3 hospitals exist:
    the directory holds 3 signed entries, enough for t=3, yet fewer than the site's minimum."""
    params = make_params(5, 3)
    sites = make_sites(params, min_cohort=4)
    real = [sites[n] for n in params.cohort[:3]]
    directory = CoordinatorSession(params).collect_keys(s.advertise(params) for s in real)
    with _refused("3 hospitals signed keys for this round; the site's policy needs 4"):
        real[0].share(directory)
    # control: a site whose policy needs 3 takes the same directory
    control = make_sites(params, min_cohort=3)
    kept = [control[n] for n in params.cohort[:3]]
    directory = CoordinatorSession(params).collect_keys(s.advertise(params) for s in kept)
    assert kept[0].share(directory).sender == params.cohort[0]


# --- stage 3: the delivered shares -------------------------------------------------------------


def _stage3(n: int, t: int) -> tuple[dict[int, SiteSession], dict[int, ShareDelivery]]:
    params = make_params(n, t)
    sites = make_sites(params)
    coordinator = CoordinatorSession(params)
    directory = coordinator.collect_keys(s.advertise(params) for s in sites.values())
    return sites, coordinator.collect_shares(s.share(directory) for s in sites.values())


def test_shares_addressed_to_another_site_are_refused() -> None:
    sites, deliveries = _stage3(4, 3)
    vector = np.zeros(make_params(4, 3).layout.length, dtype=np.uint64)
    with _refused("addressed to node 102"):
        sites[101].mask(deliveries[102], vector)


def test_a_share_moved_to_another_recipient_does_not_decrypt() -> None:
    sites, deliveries = _stage3(4, 3)
    moved = dict(deliveries[101].sealed)
    moved[103] = deliveries[102].sealed[103]  # 103's share for 102, handed to 101 as its own
    vector = np.zeros(make_params(4, 3).layout.length, dtype=np.uint64)
    with _refused("does not decrypt"):
        sites[101].mask(dataclasses.replace(deliveries[101], sealed=moved), vector)


def test_a_delivery_that_leaves_fewer_than_t_partners_is_refused() -> None:
    """Masking with one partner only would let that partner (and the coordinator) unmask it."""
    sites, deliveries = _stage3(5, 3)
    one = {102: deliveries[101].sealed[102]}
    vector = np.zeros(make_params(5, 3).layout.length, dtype=np.uint64)
    with _refused("fewer than t=3"):
        sites[101].mask(dataclasses.replace(deliveries[101], sealed=one), vector)


# --- stage 4: the reveal -----------------------------------------------------------------------


def test_a_site_listed_as_both_dropped_and_surviving_gets_nothing() -> None:
    t = run_to_masked(make_params(5, 3))
    both = UnmaskRequest(round=ROUND, dropped=(VICTIM,), survivors=t.request.survivors)
    for node in (102, 103, 104):
        with _refused("both dropped and surviving"):
            t.sites[node].reveal(both)
        with _refused("after stage ABORTED"):
            t.sites[node].reveal(t.request)  # nor anything afterwards


def _everyone_but_victim_dropped(t: Transcript) -> dict[int, Reveal]:
    """The attack: each site w is told only the victim and w survived."""
    got: dict[int, Reveal] = {}
    for node in (102, 103, 104, 105):
        others = tuple(n for n in t.request.survivors if n not in (VICTIM, node))
        claim = UnmaskRequest(round=ROUND, dropped=others, survivors=tuple(sorted((VICTIM, node))))
        got[node] = t.sites[node].reveal(claim)
    return got


def test_claiming_everyone_but_the_victim_dropped_unmasks_a_naive_site(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: without the survivor rule this attack gives the victim's exact vector."""
    _no_stage4_rules(monkeypatch)
    params = make_params(5, 3)
    t = run_to_masked(params)
    got = _everyone_but_victim_dropped(t)
    seed = _combine({params.position(n): r.seed_shares[VICTIM] for n, r in got.items()})
    pair_keys: dict[int, tuple[X25519PrivateKey, bytes]] = {}
    for x in (102, 103, 104, 105):
        shares = {params.position(n): r.key_shares[x] for n, r in got.items() if x in r.key_shares}
        private = X25519PrivateKey.from_private_bytes(_combine(shares))
        pair_keys[x] = (private, _public(t.directory, VICTIM).masking)
    guess = _unmasked_guess(t.masked[VICTIM], seed=seed, bits=params.bits, pair_keys=pair_keys)
    np.testing.assert_array_equal(guess, t.vectors[VICTIM])


def test_claiming_everyone_but_the_victim_dropped_is_refused() -> None:
    t = run_to_masked(make_params(5, 3))
    for node in (102, 103, 104, 105):
        others = tuple(n for n in t.request.survivors if n not in (VICTIM, node))
        claim = UnmaskRequest(round=ROUND, dropped=others, survivors=tuple(sorted((VICTIM, node))))
        with _refused("2 survivors, fewer than t=3"):
            t.sites[node].reveal(claim)


def test_asking_for_both_shares_of_the_victim_unmasks_a_naive_site(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: a site that answered 'dropped and surviving' would give both secrets."""
    _no_stage4_rules(monkeypatch)
    params = make_params(5, 3)
    t = run_to_masked(params)
    both = UnmaskRequest(round=ROUND, dropped=(VICTIM,), survivors=(102, 103, 104, 105, VICTIM))
    got = {n: t.sites[n].reveal(both) for n in (102, 103, 104)}
    seed = _combine({params.position(n): r.seed_shares[VICTIM] for n, r in got.items()})
    private_victim = X25519PrivateKey.from_private_bytes(
        _combine({params.position(n): r.key_shares[VICTIM] for n, r in got.items()})
    )
    # the victim's own key and each partner's public key give every pairwise mask
    guess = _unmasked_guess(t.masked[VICTIM], seed=seed, bits=params.bits)
    for x in (102, 103, 104, 105):
        peer = keys.load_public(_public(t.directory, x).masking, owner=x)
        pair = masking.pair_mask_key(private_victim, peer, round_key=ROUND, node=VICTIM, other=x)
        guess = masking.add_mask(guess, pair, sign=-masking.pair_sign(VICTIM, x), bits=params.bits)
    np.testing.assert_array_equal(guess, t.vectors[VICTIM])


def test_a_site_listed_as_dropped_itself_refuses() -> None:
    t = run_to_masked(make_params(5, 3))
    others = tuple(n for n in t.request.survivors if n != 101)
    with _refused("not listed among the survivors"):
        t.sites[101].reveal(UnmaskRequest(round=ROUND, dropped=(101,), survivors=others))


def test_a_reveal_must_classify_exactly_the_masking_partners() -> None:
    t = run_to_masked(make_params(5, 3))
    partial = UnmaskRequest(round=ROUND, dropped=(), survivors=(101, 102, 103))
    with _refused("exactly the sites this vector was masked with"):
        t.sites[101].reveal(partial)


def test_splitting_the_sites_between_two_lists_does_not_unmask_the_victim() -> None:
    """The coordinator tells 102 and 103 the victim dropped (key shares) and the rest that it
    survived (seed shares): with t > n / 2 it holds fewer than t of one of the two secrets."""
    params = make_params(5, 3)
    t = run_to_masked(params)
    survivors_without_victim = tuple(n for n in params.cohort if n != VICTIM)
    dropped_claim = UnmaskRequest(
        round=ROUND, dropped=(VICTIM,), survivors=survivors_without_victim
    )
    got: dict[int, Reveal] = {}
    for node in params.cohort:
        request = dropped_claim if node in (102, 103) else t.request
        got[node] = t.sites[node].reveal(request)
    seed_shares = {
        params.position(n): r.seed_shares[VICTIM] for n, r in got.items() if VICTIM in r.seed_shares
    }
    key_shares = {
        params.position(n): r.key_shares[VICTIM] for n, r in got.items() if VICTIM in r.key_shares
    }
    assert len(seed_shares) == 3 and len(key_shares) == 2  # no site gave both
    seed = sharing.combine(seed_shares, threshold=3)
    # two key shares rebuild a wrong key (a line through 2 of a degree-2 polynomial's points)
    guess_raw = b"".join(
        Shamir.combine([(x, s[i : i + 16]) for x, s in key_shares.items()], ssss=False)
        for i in (0, 16)
    )
    guess = X25519PrivateKey.from_private_bytes(guess_raw)
    assert keys.public_bytes(guess) != _public(t.directory, VICTIM).masking
    # removing the self mask leaves the pairwise masks: the victim's vector stays hidden
    unmasked = _unmasked_guess(t.masked[VICTIM], seed=seed, bits=params.bits)
    assert np.mean(unmasked == t.vectors[VICTIM]) < 0.01


# --- stage 2: who signed the public keys (the roster) ------------------------------------------


@pytest.mark.parametrize(
    ("resign", "match"),
    [(False, "does not match the keys it claims"), (True, "is not in the roster")],
    ids=["keeps-102s-signature", "signs-with-its-own-key"],
)
def test_keys_substituted_by_the_coordinator_are_refused(resign: bool, match: str) -> None:
    """Man in the middle: the coordinator swaps 102's encryption key for its own (to read the
    shares sent to 102), keeping 102's signature or signing with its own identity key."""
    sites, directory = _stage2(4, 3)
    mine = keys.public_bytes(X25519PrivateKey.generate())
    swapped = dataclasses.replace(_public(directory, 102), encryption=mine)
    if resign:
        swapped = _signed(swapped, signer=Signer.generate())
    entries = tuple(swapped if k.node == 102 else k for k in directory.keys)
    with _refused(match) as e:
        sites[VICTIM].share(dataclasses.replace(directory, keys=entries))
    assert e.value.reason == "secagg-unsafe" and sites[VICTIM].stage is Stage.ABORTED
    sites[103].share(directory)  # the control: the directory as relayed is accepted


def test_one_hospitals_identity_behind_two_nodes_is_refused() -> None:
    """Sybil: a hospital colluding with the coordinator signs keys for two cohort slots (nodes
    103 and 104), so the victim would count one colluder as two honest sites."""
    sites, directory = _stage2(4, 3)
    double = _signed(_public(directory, 104), signer=signer_for(103))  # a valid signature
    entries = tuple(double if k.node == 104 else k for k in directory.keys)
    with _refused(r"nodes \[103, 104\] carry one hospital's identity key"):
        sites[VICTIM].share(dataclasses.replace(directory, keys=entries))
    sites[102].share(directory)  # the control: one hospital per node is accepted


@pytest.mark.parametrize(
    ("relabel", "match"),
    [(False, "public keys of another round"), (True, "does not match the keys it claims")],
    ids=["as-is", "relabelled"],
)
def test_signed_keys_replayed_from_another_round_are_refused(relabel: bool, match: str) -> None:
    """A signature binds the keys to their round: 104's signed round-2 keys, replayed in round
    3 (as they are, or relabelled as round 3's), are refused."""
    sites, directory = _stage2(4, 3)
    earlier = RoundKey(run="run-a", round=2)
    old = make_site(104, round_key=earlier).advertise(make_params(4, 3, round_key=earlier))
    replay = dataclasses.replace(old, round=ROUND) if relabel else old
    entries = tuple(replay if k.node == 104 else k for k in directory.keys)
    with _refused(match):
        sites[VICTIM].share(dataclasses.replace(directory, keys=entries))


def _forge_keys(
    node: int, identity: bytes, signer: Signer
) -> tuple[PublicKeys, X25519PrivateKey, X25519PrivateKey]:
    encryption, mask_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    unsigned = PublicKeys(
        round=ROUND,
        node=node,
        encryption=keys.public_bytes(encryption),
        masking=keys.public_bytes(mask_key),
        identity=identity,
        signature=b"\x00",
    )
    forged = dataclasses.replace(unsigned, signature=signer.sign(unsigned.statement()))
    return forged, encryption, mask_key


def _outsider(node: int) -> tuple[bytes, Signer]:
    """The coordinator's own identity key, one per forged node: not in the roster."""
    signer = Signer.generate()
    return signer.public_bytes(), signer


def _impostor(node: int) -> tuple[bytes, Signer]:
    """The absent hospital's identity, signed with a key that is not the hospital's."""
    return signer_for(node).public_bytes(), Signer.generate()


def _play_absent_members(
    sites: dict[int, SiteSession], forger: Callable[[int], tuple[bytes, Signer]]
) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """Cohort 101-105, t=3, but only 101-103 exist: the coordinator makes keys for 104 and 105,
    reads the shares sent to them, and needs one honest share of each of the victim's secrets.
    Returns its guess of the victim's vector, and the vector."""
    params = make_params(5, 3)
    real = (101, 102, 103)
    forged = {n: _forge_keys(n, *forger(n)) for n in (104, 105)}
    published = [sites[n].advertise(params) for n in real] + [f[0] for f in forged.values()]
    directory = KeyDirectory(round=ROUND, keys=tuple(sorted(published, key=lambda k: k.node)))
    sealed = {n: sites[n].share(directory) for n in real}  # the victim (101) is asked first
    stolen: dict[int, tuple[bytes, bytes]] = {}  # forged holder -> the victim's share pair
    for holder, (_, encryption, _) in forged.items():
        peer = keys.load_public(_public(directory, VICTIM).encryption, owner=VICTIM)
        key = keys.share_key(encryption, peer, round_key=ROUND, node=holder, other=VICTIM)
        context = keys.share_context(ROUND, VICTIM, holder)
        plain = keys.unseal(key, sealed[VICTIM].sealed[holder], context=context)
        stolen[holder] = (plain[:32], plain[32:])
    # stage 3: each real site gets the real shares and shares "from" 104 and 105
    vectors = random_vectors(params)
    masked = {}
    for n in real:
        delivered = {s: sealed[s].sealed[n] for s in real if s != n}
        for holder, (_, encryption, _) in forged.items():
            peer = keys.load_public(_public(directory, n).encryption, owner=n)
            key = keys.share_key(encryption, peer, round_key=ROUND, node=holder, other=n)
            context = keys.share_context(ROUND, holder, n)
            delivered[holder] = keys.seal(key, bytes(64), context=context)
        delivery = ShareDelivery(round=ROUND, recipient=n, sealed=delivered)
        masked[n] = sites[n].mask(delivery, vectors[n]).vector
    # stage 4: 102 is told the victim dropped, 103 that it survived
    everyone = (101, 102, 103, 104, 105)
    key_share = (
        sites[102]
        .reveal(UnmaskRequest(round=ROUND, dropped=(VICTIM,), survivors=(102, 103, 104, 105)))
        .key_shares[VICTIM]
    )
    seed_share = (
        sites[103]
        .reveal(UnmaskRequest(round=ROUND, dropped=(), survivors=everyone))
        .seed_shares[VICTIM]
    )
    seed = _combine(
        {params.position(103): seed_share} | {params.position(h): s[0] for h, s in stolen.items()}
    )
    victim_key = X25519PrivateKey.from_private_bytes(
        _combine(
            {params.position(102): key_share}
            | {params.position(h): s[1] for h, s in stolen.items()}
        )
    )
    guess = _unmasked_guess(masked[VICTIM], seed=seed, bits=params.bits)
    for x in (102, 103, 104, 105):
        peer = keys.load_public(_public(directory, x).masking, owner=x)
        pair = masking.pair_mask_key(victim_key, peer, round_key=ROUND, node=VICTIM, other=x)
        guess = masking.add_mask(guess, pair, sign=-masking.pair_sign(VICTIM, x), bits=params.bits)
    return guess, vectors[VICTIM]


def test_a_coordinator_playing_absent_cohort_members_unmasks_a_site_that_checks_no_signature(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: a site that accepted any signature would hand its vector over."""
    monkeypatch.setattr(Roster, "verify", lambda self, identity_bytes, signature, data: None)
    guess, vector = _play_absent_members({n: make_site(n) for n in (101, 102, 103)}, _outsider)
    np.testing.assert_array_equal(guess, vector)


@pytest.mark.parametrize(
    ("forger", "match"),
    [(_outsider, "is not in the roster"), (_impostor, "does not match the keys it claims")],
    ids=["identity-outside-the-roster", "roster-identity-forged-signature"],
)
def test_a_coordinator_playing_absent_cohort_members_cannot_unmask_a_site(
    forger: Callable[[int], tuple[bytes, Signer]], match: str
) -> None:
    """The coordinator cannot sign for the absent hospitals 104 and 105: the victim refuses its
    directory at stage 2, before any share leaves it."""
    sites = {n: make_site(n) for n in (101, 102, 103)}
    with _refused(match) as e:
        _play_absent_members(sites, forger)
    assert e.value.reason == "secagg-unsafe"
    assert sites[VICTIM].stage is Stage.ABORTED


# --- the site's noise rule: enough honest noise in the sum ------------------------------------


def test_a_cohort_too_small_for_the_sites_noise_shares_is_refused() -> None:
    params = make_params(5, 4)
    make_site(101, colluders=1, noise_shares=4).advertise(params)  # 5 - 1 >= 4: the control
    with _refused("fewer than the 5 honest noise shares"):
        make_site(101, colluders=1, noise_shares=5).advertise(params)


def test_claiming_sites_dropped_to_thin_the_noise_gets_no_reveal() -> None:
    """Six sites each add 1/5 of the noise a site's DP guarantee needs (it counts on 5 shares).
    The coordinator claims 105 and 106 dropped: 4 >= t survivors, but their sum would carry only
    4 shares of noise, less than the site was charged for."""
    params = make_params(6, 4)
    t = run_to_masked(params, noise_shares=5)
    claim = UnmaskRequest(round=ROUND, dropped=(105, 106), survivors=(101, 102, 103, 104))
    for node in claim.survivors:
        with _refused("4 survivors with up to 0 colluders carry fewer than the 5") as e:
            t.sites[node].reveal(claim)
        assert e.value.reason == "secagg-unsafe"
    # the control: a site that needs 4 noise shares answers the same claim
    control = run_to_masked(params, noise_shares=4)
    assert control.sites[101].reveal(claim).key_shares.keys() == {105, 106}
