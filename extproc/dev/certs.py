"""Test certificates for the Envoy <-> service mTLS link: a CA, the service's, Envoy's client one.

``python -m extproc.dev.certs DIR`` writes ``ca.pem``, ``service.pem``/``service-key.pem`` (valid
for 127.0.0.1, ::1, localhost and prefix-router) and ``envoy.pem``/``envoy-key.pem`` (a client
certificate), the files ``envoy/duplex-mtls.yaml`` and ``--grpc-tls-*`` expect. For tests and local
trials only: production certificates come from the operator's CA or the mesh.
"""

from __future__ import annotations

import datetime
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, sans: list | None = None, usage=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make(folder: str | Path, *, client_cn: str = "envoy") -> Path:
    """Write a fresh CA and the two certificates into ``folder``; returns it."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("prefix-router test CA", ca_key, "prefix-router test CA", ca_key, ca=True)
    _write(out / "ca.pem", ca.public_bytes(pem))
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
            x509.DNSName("localhost"), x509.DNSName("prefix-router")]
    for name, cn, usage, alt in (("service", "prefix-router", ExtendedKeyUsageOID.SERVER_AUTH, sans),
                                 ("envoy", client_cn, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(client_cn)])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(cn, key, "prefix-router test CA", ca_key, sans=alt, usage=usage)
        _write(out / f"{name}.pem", cert.public_bytes(pem))
        _write(out / f"{name}-key.pem", key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out


if __name__ == "__main__":
    print(make(sys.argv[1] if len(sys.argv) > 1 else "certs"))
