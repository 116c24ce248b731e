"""The fleet's X.509 material: an ECDSA P-256 CA, the certificates it issues, its CRL, and 0600 key files."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sync.core.errors import WaslaError
from sync.core.fsutil import atomic_write

# P-256 ECDSA: OpenSSL 3 (Mosquitto 2.0.11 on Debian 12) and Python's ssl (paho) both handle it, the keys are
# small and signing is cheap on an ARM box. Ed25519 certificates are refused by many TLS stacks' defaults.
CURVE = ec.SECP256R1()
HASH = hashes.SHA256()
CLOCK_SKEW = dt.timedelta(minutes=10)


class CertificateError(WaslaError):
    """A certificate, key or CRL cannot be made, read or trusted."""

    exit_code = 8


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def write_private_key(path: Path, key) -> None:
    """PEM (PKCS#8, unencrypted), created 0600 so it is never readable by others, not even for an instant."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    atomic_write(path, data, mode=0o600, tmp=path.with_name(path.name + ".tmp"), durable_dir=False)


def write_public(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    write_public(path, cert.public_bytes(serialization.Encoding.PEM))


def load_key(path: Path):
    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise CertificateError(f"cannot read private key {path}: {err}") from err


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise CertificateError(f"cannot read certificate {path}: {err}") from err


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(fleet: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed root that may sign leaf certificates and CRLs only (path length 0)."""
    key = new_key()
    name = _name(f"Wasla fleet CA {fleet}", f"Wasla fleet {fleet}")
    start = now() - CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, HASH))
    return key, cert


def issue(ca_key, ca_cert: x509.Certificate, cn: str, public_key, *, server: bool = False,
          names: list[str] = (), days: int = 825, not_before: dt.datetime | None = None,
          not_after: dt.datetime | None = None) -> x509.Certificate:
    """A leaf certificate for `cn`: a client identity (a box, the hub) or, with `server`, the broker.

    The broker takes a client's MQTT username from its CN (use_identity_as_username), so the CN is the identity
    the ACL is written for. `names` become subjectAltNames (DNS or IP) a client checks the broker's against.
    """
    start = not_before or (now() - CLOCK_SKEW)
    end = not_after or (start + dt.timedelta(days=days))
    if end > ca_cert.not_valid_after_utc:
        end = ca_cert.not_valid_after_utc
    org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    builder = (x509.CertificateBuilder().subject_name(_name(cn, str(org))).issuer_name(ca_cert.subject)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
    return builder.sign(ca_key, HASH)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_crl(ca_key, ca_cert: x509.Certificate, revoked: list[tuple[int, dt.datetime]], days: int) -> x509.CertificateRevocationList:
    """The CRL the broker checks every client against; it must not expire (OpenSSL then refuses everyone)."""
    start = now() - CLOCK_SKEW
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(start)
               .next_update(min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    return builder.sign(ca_key, HASH)


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    write_public(path, crl.public_bytes(serialization.Encoding.PEM))


def verify_issued(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Raise CertificateError unless `cert` is signed by `ca_cert`."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError) as err:
        raise CertificateError(f"certificate {common_name(cert)!r} is not issued by this fleet's CA: {err}") from err
    except Exception as err:  # InvalidSignature
        raise CertificateError(f"certificate {common_name(cert)!r} has a bad signature: {err}") from err
