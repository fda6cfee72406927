"""A throwaway PKI for the TLS tests: certificate authorities, server and client certificates as PEM
files, one function call per artifact.

    ca = make_ca(tmp_path)                                  # ca.cert_path: the CA bundle
    server = server_cert(ca, tmp_path)                      # SANs 127.0.0.1 and localhost
    alice = client_cert(ca, tmp_path, "alice", uri="spiffe://test/alice")
    other = client_cert(make_ca(tmp_path, "other CA"), tmp_path, "mallory")  # wrong CA

Keys are EC P-256: generating them takes microseconds, RSA would take a good part of a second.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = datetime.timedelta(days=2)
_CA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


@dataclass(frozen=True)
class CA:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_path: Path  # the PEM certificate: what --tls-client-ca and clients' trust roots read


@dataclass(frozen=True)
class Issued:
    cert_path: Path  # PEM: the leaf, then its CA (a chain a server can present as is)
    key_path: Path  # PEM, PKCS#8, unencrypted
    serial: int

    def read(self) -> tuple[bytes, bytes]:
        """(key, chain) as bytes: what grpcio's credentials take."""
        return self.key_path.read_bytes(), self.cert_path.read_bytes()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(directory: Path, name: str = "inferplane test CA") -> CA:
    """A self-signed CA; its certificate is written to `<directory>/<name>.crt`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{_slug(name)}.crt"
    path.write_bytes(_pem(cert))
    return CA(name, key, cert, path)


def _issue(
    ca: CA,
    directory: Path,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    serial: int | None,
    organization: str | None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization is not None:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    serial = serial if serial is not None else x509.random_serial_number()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    stem = directory / f"{_slug(common_name)}-{serial:x}"
    cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
    cert_path.write_bytes(_pem(cert) + _pem(ca.cert))
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)
    return Issued(cert_path, key_path, serial)


def server_cert(
    ca: CA, directory: Path, common_name: str = "localhost", *, serial: int | None = None
) -> Issued:
    """A server certificate for 127.0.0.1 and localhost (SANs), signed by `ca`."""
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    return _issue(ca, directory, common_name, sans, ExtendedKeyUsageOID.SERVER_AUTH, serial, None)


def client_cert(
    ca: CA,
    directory: Path,
    common_name: str = "client",
    *,
    uri: str | None = "spiffe://inferplane.test/client",
    email: str | None = None,
    dns: str | None = None,
    organization: str | None = "inferplane tests",
    serial: int | None = None,
) -> Issued:
    """A client certificate with CN `common_name` and, where given, URI/email/DNS SANs."""
    sans: list[x509.GeneralName] = []
    if dns is not None:
        sans.append(x509.DNSName(dns))
    if uri is not None:
        sans.append(x509.UniformResourceIdentifier(uri))
    if email is not None:
        sans.append(x509.RFC822Name(email))
    return _issue(
        ca, directory, common_name, sans, ExtendedKeyUsageOID.CLIENT_AUTH, serial, organization
    )


def serial_of(pem: bytes | str) -> int:
    """The serial number of the first certificate in `pem` (e.g. what a server presented)."""
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data).serial_number
