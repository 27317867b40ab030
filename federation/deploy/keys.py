"""TLS certificates and SuperNode authentication keys for a Flower 1.42 deployment.

Uses only `cryptography` (no hand-rolled crypto, no openssl subprocess).  The SuperLink needs
`--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key`; SuperNodes and the
CLI trust `ca.crt`.  With `--enable-supernode-auth` each SuperNode signs with an EC key in OpenSSH
format whose `.pub` is registered via `flwr supernode register` (docs/flower.md, "Node authentication").

Private keys are created with mode 0o600 from the first byte (write_atomic), never world-readable.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from minusface.atomic import write_atomic

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700
_CURVE = ec.SECP384R1
_HASH = hashes.SHA384
_CLOCK_SKEW = dt.timedelta(minutes=5)  # tolerate peers whose clocks run slightly behind


def _prepare_dir(out_dir: str | os.PathLike) -> Path:
    """Create `out_dir` (0o700) if missing; an existing directory keeps its mode."""
    path = Path(out_dir)
    if not path.is_dir():
        path.mkdir(parents=True, mode=DIR_MODE)
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def _refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    """Check every target up front so a refusal never leaves a half-written set."""
    if overwrite:
        return
    for p in paths:
        if os.path.lexists(p):
            raise FileExistsError(f"{p} already exists; pass overwrite=True to replace it")


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write `data` so the file has exactly `mode` before any byte lands in it, atomically;
    without overwrite an existing file (even one that appeared meanwhile) is never replaced
    (FileExistsError), so an old 0o644 file never receives key material."""
    write_atomic(path, lambda file: file.write(data), mode=mode, replace=overwrite)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE | re.ASCII)
_EXPECTED = "expected a DNS name (e.g. superlink.example.org) or an IP address (e.g. 10.0.0.5, ::1)"
SERVER_CN = "minusfed SuperLink"  # used when the first host does not fit X.509's 64-char CN
_CN_MAX = 64


def _dns_problem(host: str) -> str | None:
    """Why `host` is not an RFC 1123 DNS name (a '*' first label is allowed), or None."""
    if "://" in host:
        return "give the host without a scheme such as https://"
    if any(c.isspace() for c in host):
        return "contains whitespace"
    if ":" in host or "/" in host or host.startswith("["):
        return "not a DNS name or IP address (give the host without port, scheme or brackets)"
    if host.endswith("."):
        return "give the name without a trailing dot"
    if len(host) > 253:
        return f"is {len(host)} characters, a DNS name has at most 253"
    labels = host.split(".")
    if labels[-1].isdigit():
        return "not a valid IP address (and a DNS name cannot end in a numeric label)"
    if labels[0] == "*" and len(labels) >= 3:
        labels = labels[1:]                        # wildcard: *.example.org, not *.org
    for label in labels:
        if len(label) > 63:
            return f"label {label[:20]}... is {len(label)} characters, at most 63"
        if not _LABEL.fullmatch(label):
            return (f"label {label!r} is not allowed: labels are 1-63 ASCII letters, digits and "
                    f"inner hyphens (give internationalised names in their xn-- form)")
    return None


def _general_name(host: object) -> x509.GeneralName:
    """IPAddress for an IPv4/IPv6 literal, DNSName for a valid host name; ValueError naming
    the host otherwise (a bad SAN would only show up as a failed TLS handshake later)."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"--hosts {host!r}: empty or not a string; {_EXPECTED}")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    problem = _dns_problem(host)
    if problem:
        raise ValueError(f"--hosts {host!r}: {problem}; {_EXPECTED}")
    return x509.DNSName(host)


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    """DNSName for names, IPAddress for IPv4/IPv6 literals; every host validated first."""
    return x509.SubjectAlternativeName([_general_name(h) for h in hosts])


def _server_cn(first_host: str) -> str:
    """TLS checks the SANs; the CN is informational and X.509 caps it at 64 characters."""
    return first_host if len(first_host) <= _CN_MAX else SERVER_CN


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days)))


def make_ca_and_server_cert(out_dir: str | os.PathLike,
                            hosts: Iterable[str] = ("localhost", "127.0.0.1", "::1"),
                            days: int = 365, overwrite: bool = False) -> dict[str, Path]:
    """Write a private CA (`ca.crt`, `ca.key`) and a SuperLink certificate it signs
    (`server.pem`, `server.key`) with a SAN for every host; EC P-384, SHA-384.

    Each host must be an IP address or an RFC 1123 DNS name (no port, scheme or spaces;
    ``*.example.org`` allowed); a bad one raises ValueError naming it before anything is
    written.  The CN is the first host when it fits X.509's 64 characters, else `SERVER_CN`.

    Returns {'ca_cert', 'ca_key', 'server_cert', 'server_key'} -> path."""
    hosts = [hosts] if isinstance(hosts, str) else list(hosts)
    if not hosts:
        raise ValueError("hosts must name at least one DNS name or IP address")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    san = _san(hosts)                              # refuse bad hosts before touching the disk
    out = _prepare_dir(out_dir)
    paths = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key",
             "server_cert": out / "server.pem", "server_key": out / "server.key"}
    _refuse_existing(paths.values(), overwrite)

    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "minusfed"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "minusfed federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=False, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(ca_ski, critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                              critical=False)
               .sign(ca_key, _HASH()))

    srv_key = ec.generate_private_key(_CURVE())
    srv_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "minusfed"),
                          x509.NameAttribute(NameOID.COMMON_NAME, _server_cn(hosts[0]))])
    srv_cert = (_builder(srv_name, ca_name, srv_key.public_key(), days)
                .add_extension(san, critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=True, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                               critical=False)
                .sign(ca_key, _HASH()))

    pem = serialization.Encoding.PEM
    _write(paths["ca_key"], _key_pem(ca_key), KEY_MODE, overwrite)
    _write(paths["ca_cert"], ca_cert.public_bytes(pem), CERT_MODE, overwrite)
    _write(paths["server_key"], _key_pem(srv_key), KEY_MODE, overwrite)
    _write(paths["server_cert"], srv_cert.public_bytes(pem), CERT_MODE, overwrite)
    return paths


def make_node_keys(out_dir: str | os.PathLike, n: int, prefix: str = "supernode",
                   overwrite: bool = False) -> list[tuple[Path, Path]]:
    """Write `n` SuperNode auth key pairs (EC P-384, OpenSSH format): private `{prefix}-{i}`
    (0o600) and public `{prefix}-{i}.pub` (0o644) for i = 0..n-1, matching partition ids.

    Returns [(private_path, public_path), ...]."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not prefix or os.sep in prefix or (os.altsep and os.altsep in prefix):
        raise ValueError(f"prefix must be a plain file name, got {prefix!r}")
    out = _prepare_dir(out_dir)
    pairs = [(out / f"{prefix}-{i}", out / f"{prefix}-{i}.pub") for i in range(n)]
    _refuse_existing([p for pair in pairs for p in pair], overwrite)
    for priv_path, pub_path in pairs:
        key = ec.generate_private_key(_CURVE())
        priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                 serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH)
        _write(priv_path, priv, KEY_MODE, overwrite)
        _write(pub_path, pub + b"\n", CERT_MODE, overwrite)
    return pairs
