"""Certificates for mutual TLS between agents and the Temporal server (`sendense certs make DIR`).

A private CA, one server certificate (serverAuth and clientAuth: Temporal's services also dial each
other with it) for the names the server is reached by, and one client certificate per client
(worker, ui, admin ...). ECDSA P-256, SHA-256. Every file is created exclusively (never over an
existing file, never through a symlink) with mode 0600, in a 0700 directory; an existing CA in DIR is
reused, so more clients can be added later.

    DIR/ca.pem ca-key.pem   server.pem server-key.pem   <client>.pem <client>-key.pem
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sendense.errors import SendenseError

DEFAULT_SERVER_NAMES = ("temporal", "localhost", "127.0.0.1")
DEFAULT_CLIENTS = ("worker", "ui", "admin")
CA_DAYS = 3650
LEAF_DAYS = 825
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class CertError(SendenseError):
    kind = "CertError"


@dataclass
class Made:
    dir: Path
    ca_reused: bool
    files: list[Path] = field(default_factory=list)


def _write_private(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise CertError(f"{path}: already exists (certificates and keys are never overwritten)") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sendense"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _load_ca(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_p, key_p = d / "ca.pem", d / "ca-key.pem"
    if not cert_p.exists() and not key_p.exists():
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_p.read_bytes())
        key = serialization.load_pem_private_key(key_p.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise CertError(f"{d}: its CA (ca.pem, ca-key.pem) cannot be read: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{d}: ca-key.pem is not an EC key")
    return cert, key


def _new_ca(d: Path, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("sendense CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    cn: str,
    names: Sequence[str],
    server: bool,
    now: datetime.datetime,
    *,
    uris: Sequence[str] = (),
    days: float = LEAF_DAYS,
) -> tuple[bytes, bytes]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if names or uris:
        san = (list(_san(names)) if names else []) + [x509.UniformResourceIdentifier(u) for u in uris]
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _ca(d: Path, now: datetime.datetime) -> tuple[tuple[x509.Certificate, ec.EllipticCurvePrivateKey], Made]:
    """DIR (0700) and its CA: the one there, else a new one (written, and listed as made)."""
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    d.chmod(0o700)
    ca = _load_ca(d)
    made = Made(dir=d, ca_reused=ca is not None)
    if ca is None:
        ca = _new_ca(d, now)
        _write_private(d / "ca-key.pem", _key_pem(ca[1]))
        _write_private(d / "ca.pem", ca[0].public_bytes(serialization.Encoding.PEM))
        made.files += [d / "ca.pem", d / "ca-key.pem"]
    return ca, made


def make(
    d: Path,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    clients: Sequence[str] | None = None,
) -> Made:
    """Make what DIR lacks: the CA (else reuse it), the server certificate (if absent) and `clients`
    (default: worker, ui, admin for a new CA, none for an existing one)."""
    for c in clients or ():
        if not NAME.match(c) or c in ("ca", "server"):
            raise CertError(f"client name {c!r}: 1-63 of a-z 0-9 . _ - (and not ca or server)")
    for n in server_names:
        if not n or len(n) > 253 or not re.match(r"^[A-Za-z0-9.*:-]+$", n):
            raise CertError(f"server name {n!r}: a DNS name or an IP address")
    now = datetime.datetime.now(datetime.UTC)
    ca, made = _ca(d, now)
    if not made.ca_reused and clients is None:
        clients = DEFAULT_CLIENTS
    todo: list[tuple[str, Sequence[str], bool]] = []
    if not (d / "server.pem").exists():
        todo.append(("server", list(server_names), True))
    todo += [(c, [], False) for c in clients or ()]
    for stem, names, server in todo:
        cert, key = _leaf(ca, stem if not server else (names[0] if names else "server"), names, server, now)
        _write_private(d / f"{stem}-key.pem", key)
        _write_private(d / f"{stem}.pem", cert)
        made.files += [d / f"{stem}.pem", d / f"{stem}-key.pem"]
    return made


AGENT_URI = "sendense://host/"  # (sendense.datapath.remote.HOST_URI: the name a data peer is checked by)
HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def agent(d: Path, host_id: str, addresses: Sequence[str] = (), *, days: float = LEAF_DAYS) -> Made:
    """An agent's certificate for data connections between agents (and for Temporal mTLS): server
    and client use, named `sendense://host/<host_id>` (what peers check) and `addresses` (IPs or
    DNS names the agent is reached at), signed by DIR's CA (made if DIR has none).
    Files: DIR/agent-<host_id>.pem and agent-<host_id>-key.pem. `days` < 0 makes an expired one (tests)."""
    if not HOST_ID.match(host_id):
        raise CertError(f"host id {host_id!r}: 1-63 of A-Z a-z 0-9 . _ - (as SENDENSE_HOST_ID)")
    for n in addresses:
        if not n or len(n) > 253 or not re.match(r"^[A-Za-z0-9.:-]+$", n):
            raise CertError(f"address {n!r}: a DNS name or an IP address")
    now = datetime.datetime.now(datetime.UTC)
    ca, made = _ca(d, now)
    start = now if days > 0 else now + datetime.timedelta(days=days * 2)
    uris = [AGENT_URI + host_id]
    cert, key = _leaf(ca, f"agent {host_id}", list(addresses), True, start, uris=uris, days=abs(days))
    stem = f"agent-{host_id}"
    _write_private(d / f"{stem}-key.pem", key)
    _write_private(d / f"{stem}.pem", cert)
    made.files += [d / f"{stem}.pem", d / f"{stem}-key.pem"]
    return made
