"""`fedfusion certs`: a CA-signed server certificate TLS accepts, SuperNode keys Flower loads."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from common.certs import CredentialError, CredentialLayout, write_credentials
from tools.cli import main

# its module-scoped fixture is built once: every test of the module on one xdist worker
pytestmark = pytest.mark.xdist_group("test_certs")


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> CredentialLayout:
    root = tmp_path_factory.mktemp("certs") / "creds"
    write_credentials(
        root,
        sans=["localhost", "127.0.0.1", "::1", "link.example.org"],
        hospitals=["hospital-a", "hospital-b"],
    )
    return CredentialLayout(root)


def _handshake(creds: CredentialLayout, server_hostname: str) -> str:
    """One TLS handshake over a socket pair: server with server.crt, client trusting only ca.crt."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    client_ctx = ssl.create_default_context(cafile=str(creds.ca_cert))
    a, b = socket.socketpair()
    errors: list[Exception] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as s:
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as err:
            errors.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(a, server_hostname=server_hostname) as c:
            return c.recv(2).decode()
    finally:
        thread.join(timeout=10)


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "link.example.org"])
def test_tls_client_trusting_the_ca_accepts_the_server_for_every_san(
    creds: CredentialLayout, name: str
) -> None:
    assert _handshake(creds, name) == "ok"


def test_tls_client_rejects_a_name_outside_the_sans(creds: CredentialLayout) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        _handshake(creds, "other.example.org")


def test_server_certificate_is_issued_by_the_ca_for_server_auth_only(
    creds: CredentialLayout,
) -> None:
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_supernode_keys_load_as_flower_loads_them(creds: CredentialLayout) -> None:
    for name in ("hospital-a", "hospital-b"):
        # as flower-supernode --auth-supernode-private-key reads it
        private = load_ssh_private_key(creds.node_key(name).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        # as `flwr supernode register` reads the public key: the same key
        assert try_load_public_key(creds.node_public_key(name)) == public_key_to_bytes(
            private.public_key()
        )
    assert creds.node_key("hospital-a").read_bytes() != creds.node_key("hospital-b").read_bytes()


def test_private_keys_are_readable_by_the_owner_only(creds: CredentialLayout) -> None:
    for key in (creds.ca_key, creds.server_key, creds.node_key("hospital-a")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(creds.ca_cert.stat().st_mode) == 0o644


def test_existing_files_are_named_and_kept_unless_forced(tmp_path: Path) -> None:
    root = tmp_path / "creds"
    write_credentials(root, sans=["localhost"], hospitals=["hospital-a"])
    layout = CredentialLayout(root)
    before = layout.server_key.read_bytes()
    with pytest.raises(CredentialError, match=r"server\.key") as err:
        write_credentials(root, sans=["localhost"], hospitals=["hospital-a"])
    assert str(layout.node_key("hospital-a")) in str(err.value)
    assert layout.server_key.read_bytes() == before
    write_credentials(root, sans=["localhost"], hospitals=["hospital-a"], force=True)
    assert layout.server_key.read_bytes() != before
    assert stat.S_IMODE(layout.server_key.stat().st_mode) == 0o600


def test_keys_only_writes_a_hospital_key_pair_next_to_existing_credentials(tmp_path: Path) -> None:
    write_credentials(tmp_path, sans=["localhost"], hospitals=["hospital-a"])
    files = write_credentials(tmp_path, sans=[], hospitals=["hospital-c"], server=False)
    layout = CredentialLayout(tmp_path)
    assert files == [layout.node_key("hospital-c"), layout.node_public_key("hospital-c")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hospitals": ["../escape"]}, "cannot name a key folder"),
        ({"hospitals": ["a", "a"]}, "repeat"),
        ({"sans": ["not a host!"]}, "neither an IP address nor a valid host name"),
        ({"sans": []}, "at least one --san"),
        ({"days": 0}, "at least 1"),
    ],
)
def test_invalid_requests_say_what_to_fix(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"sans": ["localhost"], "hospitals": ["hospital-a"], **kwargs}
    with pytest.raises(CredentialError, match=message):
        write_credentials(tmp_path / "creds", **args)
    assert not (tmp_path / "creds").exists()


def test_command_writes_default_sans_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["certs", str(tmp_path), "--hospital", "hospital-a"]) == 0
    server = x509.load_pem_x509_certificate(CredentialLayout(tmp_path).server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert len(san.get_values_for_type(x509.IPAddress)) == 2
    assert main(["certs", str(tmp_path), "--san", "link.example.org"]) == 2
    assert "Refusing to overwrite" in capsys.readouterr().err
    assert main(["certs", str(tmp_path), "--san", "link.example.org", "--force"]) == 0
    server = x509.load_pem_x509_certificate(CredentialLayout(tmp_path).server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org"]
