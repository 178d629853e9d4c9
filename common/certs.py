"""Deployment credentials: a CA, the SuperLink's TLS certificate, and SuperNode key pairs.

Flower 1.42 wants, for TLS, PEM files (CA certificate, server certificate and key) passed to
`flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`; SuperNodes and `flwr` trust
the CA certificate. For SuperNode authentication it wants an elliptic-curve key pair on a NIST
curve in OpenSSH format: the private key (unencrypted) for `flower-supernode
--auth-supernode-private-key`, the public key for `flwr supernode register`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigurationError

DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1  # P-384: the curve Flower's SuperNode authentication guide uses
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

_HOSTNAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")
_HOSPITAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CredentialError(ConfigurationError):
    """A credential request is invalid or would overwrite existing files."""


@dataclass(frozen=True)
class CredentialLayout:
    """Where each credential file lives under one output folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        """The CA certificate: every SuperNode and `flwr` trusts it (`--root-certificates`)."""
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The CA private key: signs server certificates; keep it offline."""
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's TLS certificate (`--ssl-certfile`)."""
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        """The SuperLink's TLS private key (`--ssl-keyfile`)."""
        return self.root / "server.key"

    def node_key(self, hospital: str) -> Path:
        """A hospital's SuperNode private key (`--auth-supernode-private-key`)."""
        return self.root / "hospitals" / hospital / "supernode.key"

    def node_public_key(self, hospital: str) -> Path:
        """A hospital's SuperNode public key (`flwr supernode register`)."""
        return self.root / "hospitals" / hospital / "supernode.pub"


def parse_san(entry: str) -> x509.GeneralName:
    """One subject alternative name: an IP address, or else a DNS host name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        pass
    if not _HOSTNAME.match(entry):
        raise CredentialError(
            f"'{entry}' is neither an IP address nor a valid host name. Give each name the "
            "SuperNodes use to reach the SuperLink, e.g. --san superlink.example.org "
            "--san 10.0.0.5."
        )
    return x509.DNSName(entry)


def check_hospital_name(name: str) -> str:
    """A hospital name becomes a folder name: letters, digits, '.', '_', '-' only."""
    if not _HOSPITAL.match(name) or name in (".", ".."):
        raise CredentialError(
            f"Hospital name '{name}' cannot name a key folder: use 1-64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (e.g. hospital-a)."
        )
    return name


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedFusion"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    # backdate a little: a node whose clock runs a few minutes late still accepts the certificate
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def make_ca(*, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only."""
    key = ec.generate_private_key(CURVE())
    subject = _name("FedFusion federation CA")
    builder = _validity(x509.CertificateBuilder(), days).subject_name(subject).issuer_name(subject)
    cert = (
        builder.public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *, sans: list[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink, valid for every name in `sans`."""
    if not sans:
        raise CredentialError("The server certificate needs at least one --san (host name or IP).")
    names = [parse_san(s) for s in dict.fromkeys(sans)]
    key = ec.generate_private_key(CURVE())
    builder = _validity(x509.CertificateBuilder(), days).subject_name(_name(sans[0]))
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        builder.issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keys(hospital: str) -> tuple[bytes, bytes]:
    """A SuperNode key pair as (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" fedfusion-{hospital}\n".encode()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (a private key is never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have removed bits from a public file's mode


def planned_files(layout: CredentialLayout, hospitals: list[str], *, server: bool) -> list[Path]:
    """Every file `write_credentials` would write, in order."""
    files = [layout.ca_cert, layout.ca_key, layout.server_cert, layout.server_key] if server else []
    for h in hospitals:
        files += [layout.node_key(h), layout.node_public_key(h)]
    return files


def write_credentials(
    root: Path,
    *,
    sans: list[str],
    hospitals: list[str],
    days: int = 365,
    server: bool = True,
    force: bool = False,
) -> list[Path]:
    """Write the CA + server certificate (if `server`), one key pair per hospital; return the files.

    Nothing is written when any target exists and `force` is false.
    """
    if days < 1:
        raise CredentialError(f"--days must be at least 1 (got {days}).")
    hospitals = [check_hospital_name(h) for h in hospitals]
    if len(set(hospitals)) != len(hospitals):
        raise CredentialError(
            f"Hospital names repeat in {hospitals}: each hospital needs its own key."
        )
    if not server and not hospitals:
        raise CredentialError("Nothing to write: give --hospital NAME (with --keys-only).")
    layout = CredentialLayout(root)
    files = planned_files(layout, hospitals, server=server)
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:
        raise CredentialError(
            "Refusing to overwrite existing credentials: " + ", ".join(existing) + ". Move them "
            "away, choose another folder, or pass --force (a new CA invalidates every certificate "
            "and a new key pair must be registered again)."
        )
    contents: list[tuple[bytes, int]] = []
    if server:
        ca_key, ca_cert = make_ca(days=days)
        key, cert = make_server_cert(ca_key, ca_cert, sans=sans, days=days)
        contents += [
            (_pem_cert(ca_cert), PUBLIC_MODE),
            (_pem_key(ca_key), PRIVATE_MODE),
            (_pem_cert(cert), PUBLIC_MODE),
            (_pem_key(key), PRIVATE_MODE),
        ]
    for h in hospitals:
        private, public = make_node_keys(h)
        contents += [(private, PRIVATE_MODE), (public, PUBLIC_MODE)]
    for path, (data, mode) in zip(files, contents, strict=True):
        _write(path, data, mode)
    return files
