"""Identity keys (common/secagg/identity.py): the SuperNode's key signs, the roster file checks."""

from __future__ import annotations

import base64
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.certs import make_node_keys
from common.errors import ConfigurationError, Refusal
from common.secagg.coordinator import CoordinatorSession
from common.secagg.identity import Roster, Signer, fingerprint
from common.secagg.site import SiteSession
from tests.secagg_helpers import ROSTER, ROUND, make_params, make_sites, plain_sum, signer_for

_PEM = serialization.Encoding.PEM
_OPENSSH = serialization.PrivateFormat.OpenSSH
_PKCS8 = serialization.PrivateFormat.PKCS8
_NONE = serialization.NoEncryption()


def test_a_supernode_key_signs_and_its_public_line_is_a_roster_entry(tmp_path: Path) -> None:
    """The P-384 OpenSSH pair `fedfusion certs` makes: the private key signs, the .pub line
    (as `flwr supernode register` takes it) checks, with a fixed-size 96-byte signature."""
    private, public = make_node_keys("hospital-a")
    (tmp_path / "node.key").write_bytes(private)
    other = Signer.generate(algorithm="ecdsa-p384")
    roster_file = tmp_path / "roster.pub"
    roster_file.write_bytes(
        b"# the consortium\n\n" + public + b"   \n" + other.openssh_public_key() + b"\n"
    )
    signer, roster = Signer.load(tmp_path / "node.key"), Roster.load(roster_file)
    assert len(roster) == 2 and signer.public_bytes() in roster
    assert len(signer.public_bytes()) == 136
    signature = signer.sign(b"the keys")
    assert len(signature) == 96
    roster.verify(signer.public_bytes(), signature, b"the keys")
    with pytest.raises(Refusal, match="does not match") as e:
        roster.verify(signer.public_bytes(), signature, b"other keys")
    assert e.value.reason == "secagg-unsafe"
    with pytest.raises(Refusal, match="does not match"):
        roster.verify(signer.public_bytes(), signature[:-1], b"the keys")
    fresh = Signer.generate()
    with pytest.raises(Refusal, match=re.escape(f"{fingerprint(fresh.public_bytes())} is not in")):
        roster.verify(fresh.public_bytes(), fresh.sign(b"x"), b"x")


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP384R1()).private_bytes(_PEM, _PKCS8, _NONE),
        lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
            _PEM, serialization.PrivateFormat.TraditionalOpenSSL, _NONE
        ),
        lambda: Ed25519PrivateKey.generate().private_bytes(_PEM, _OPENSSH, _NONE),
        lambda: Ed25519PrivateKey.generate().private_bytes(_PEM, _PKCS8, _NONE),
    ],
    ids=["pem-p384", "pem-p256-sec1", "openssh-ed25519", "pem-ed25519"],
)
def test_pem_and_openssh_ec_and_ed25519_keys_load(tmp_path: Path, make: object) -> None:
    path = tmp_path / "key"
    path.write_bytes(make())  # type: ignore[operator]
    signer = Signer.load(path)
    roster_file = tmp_path / "roster"
    roster_file.write_bytes(signer.openssh_public_key() + b" hospital-b\n")
    Roster.load(roster_file).verify(signer.public_bytes(), signer.sign(b"m"), b"m")
    assert Roster.of([signer.public_bytes()]).__contains__(signer.public_bytes())


def test_keys_that_cannot_be_identities_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read") as e:
        Signer.load(tmp_path / "missing.key")
    assert e.value.reason == "node-config"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "rsa").write_bytes(rsa_key.private_bytes(_PEM, _PKCS8, _NONE))
    with pytest.raises(ConfigurationError, match="RSA"):
        Signer.load(tmp_path / "rsa")
    locked = Ed25519PrivateKey.generate().private_bytes(
        _PEM, _PKCS8, serialization.BestAvailableEncryption(b"pass")
    )
    (tmp_path / "locked").write_bytes(locked)
    with pytest.raises(ConfigurationError, match="unencrypted"):
        Signer.load(tmp_path / "locked")
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(ConfigurationError, match="unencrypted OpenSSH or PEM"):
        Signer.load(tmp_path / "junk")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("ssh-ed25519 AAAA-not-base64\n", "line 2: not an OpenSSH public key line"),
        ("hello world\n", "line 2: not an OpenSSH public key line"),
        ("{rsa}\n", "line 2: the key is a RSAPublicKey"),
        ("{good}\n", "line 2: repeats the key of line 1"),
    ],
)
def test_a_malformed_roster_line_names_the_file_and_line(
    tmp_path: Path, text: str, match: str
) -> None:
    good = signer_for(101).openssh_public_key().decode()
    rsa_line = (
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    path = tmp_path / "roster.pub"
    path.write_text(good + "\n" + text.format(rsa=rsa_line, good=good))
    with pytest.raises(ConfigurationError, match=match) as e:
        Roster.load(path)
    assert str(path) in e.value.detail and e.value.reason == "node-config"


def test_an_empty_roster_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "roster.pub"
    path.write_text("# nobody yet\n\n")
    with pytest.raises(ConfigurationError, match="lists no public key"):
        Roster.load(path)
    with pytest.raises(ConfigurationError, match="empty"):
        Roster.of([])
    with pytest.raises(ConfigurationError, match="not an OpenSSH"):
        Roster.of([b"\x00\x00\x00\x03abc"])


def test_a_site_whose_own_key_is_not_in_the_roster_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not in the roster") as e:
        SiteSession(
            node=101,
            round_key=ROUND,
            min_cohort=3,
            colluders=0,
            signer=Signer.generate(),
            roster=ROSTER,
        )
    assert e.value.reason == "node-config"


def test_a_coordinator_with_the_roster_drops_unsigned_and_doubled_keys_and_goes_on() -> None:
    """One faulty site must not stop the round: the entries honest sites would refuse the whole
    directory for are left out at stage 1."""
    params = make_params(7, 4)
    sites = make_sites(params)
    replies = {n: s.advertise(params) for n, s in sites.items()}
    replies[102] = dataclasses.replace(replies[102], signature=bytes(64))  # a bad signature
    outsider = Signer.generate()
    replies[103] = dataclasses.replace(
        replies[103],
        identity=outsider.public_bytes(),
        signature=outsider.sign(replies[103].statement()),
    )
    # 107 claims 106's identity (it cannot sign as 106): it drops itself, not 106 with it
    replies[107] = dataclasses.replace(replies[107], identity=replies[106].identity)
    coordinator = CoordinatorSession(params, roster=ROSTER)
    directory = coordinator.collect_keys(replies.values())
    assert [k.node for k in directory.keys] == [101, 104, 105, 106]
    deliveries = coordinator.collect_shares(sites[k.node].share(directory) for k in directory.keys)
    vectors = {n: np.full(params.layout.length, n, dtype=np.uint64) for n in deliveries}
    request = coordinator.collect_masked(
        sites[n].mask(d, vectors[n]) for n, d in deliveries.items()
    )
    result = coordinator.collect_reveals(sites[n].reveal(request) for n in request.survivors)
    np.testing.assert_array_equal(result.vector, plain_sum(vectors, deliveries, 32))


def test_a_coordinator_without_a_roster_still_drops_one_identity_behind_two_nodes() -> None:
    params = make_params(5, 3)
    sites = make_sites(params)
    replies = {n: s.advertise(params) for n, s in sites.items()}
    twin = signer_for(104)
    replies[105] = dataclasses.replace(
        replies[105], identity=twin.public_bytes(), signature=twin.sign(replies[105].statement())
    )
    directory = CoordinatorSession(params).collect_keys(replies.values())
    assert [k.node for k in directory.keys] == [101, 102, 103]
    sites[101].share(directory)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_a_fingerprint_is_the_one_ssh_keygen_prints(tmp_path: Path) -> None:
    """An operator compares the fingerprint in a refusal with `ssh-keygen -l` of a .pub file."""
    _, public = make_node_keys("hospital-a")
    (tmp_path / "node.pub").write_bytes(public)
    roster = Roster.load(tmp_path / "node.pub")
    printed = subprocess.run(
        ["ssh-keygen", "-lf", str(tmp_path / "node.pub")], capture_output=True, check=True
    ).stdout.split()[1]
    identity = base64.b64decode(public.split()[1])  # the .pub line's key field
    assert identity in roster and fingerprint(identity) == printed.decode()
