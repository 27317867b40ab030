"""TLS CA/server certificates and SuperNode auth keys: modes, extensions, chain, real handshake."""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.deploy.keys import SERVER_CN, make_ca_and_server_cert, make_node_keys

NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, Path]:
    return make_ca_and_server_cert(tmp_path_factory.mktemp("tls") / "certs")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    return make_ca_and_server_cert(tmp_path_factory.mktemp("other"))["ca_cert"]


def test_files_and_modes(tls):
    assert set(tls) == {"ca_cert", "ca_key", "server_cert", "server_key"}
    assert _mode(tls["ca_cert"].parent) == 0o700
    for name in ("ca_key", "server_key"):
        assert _mode(tls[name]) == 0o600
        serialization.load_pem_private_key(tls[name].read_bytes(), password=None)
    for name in ("ca_cert", "server_cert"):
        assert _mode(tls[name]) == 0o644
    assert [p.name for p in tls.values()] == ["ca.crt", "ca.key", "server.pem", "server.key"]


def test_ca_and_server_extensions(tls):
    ca, srv = _cert(tls["ca_cert"]), _cert(tls["server_cert"])
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    srv.verify_directly_issued_by(ca)
    assert not srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert srv.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    aki = srv.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_tls_refuses_overwrite(tmp_path):
    paths = make_ca_and_server_cert(tmp_path)
    old = paths["server_key"].read_bytes()
    with pytest.raises(FileExistsError, match="ca.crt"):
        make_ca_and_server_cert(tmp_path)
    assert paths["server_key"].read_bytes() == old
    paths["server_key"].chmod(0o644)  # a stale loose mode must not survive the rewrite
    make_ca_and_server_cert(tmp_path, overwrite=True)
    assert paths["server_key"].read_bytes() != old and _mode(paths["server_key"]) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]


def test_node_keys(tmp_path):
    pairs = make_node_keys(tmp_path, 3, prefix="sn")
    assert [(a.name, b.name) for a, b in pairs] == [(f"sn-{i}", f"sn-{i}.pub") for i in range(3)]
    seen = set()
    for priv_path, pub_path in pairs:
        assert _mode(priv_path) == 0o600 and _mode(pub_path) == 0o644
        priv = serialization.load_ssh_private_key(priv_path.read_bytes(), password=None)
        pub = serialization.load_ssh_public_key(pub_path.read_bytes())
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, NIST_CURVES)
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert pub.public_numbers() == priv.public_key().public_numbers()
        seen.add(pub.public_numbers().x)
    assert len(seen) == 3
    with pytest.raises(FileExistsError, match="sn-0"):
        make_node_keys(tmp_path, 1, prefix="sn")
    make_node_keys(tmp_path, 1, prefix="sn", overwrite=True)
    assert _mode(pairs[0][0]) == 0o600
    with pytest.raises(ValueError):
        make_node_keys(tmp_path, 0)


def _handshake(tls: dict[str, Path], cafile: Path, server_hostname: str) -> None:
    """One TLS handshake against a throwaway server on 127.0.0.1; raises the client's error."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls["server_cert"], tls["server_key"])
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(5)
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.recv(1)  # wait for the client's close (or its failure alert)
            except (OSError, ssl.SSLError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as conn:
                    assert conn.version() in ("TLSv1.2", "TLSv1.3")
        finally:
            thread.join(timeout=5)
    assert not thread.is_alive()


def test_tls_handshake(tls, other_ca):
    _handshake(tls, tls["ca_cert"], "localhost")
    _handshake(tls, tls["ca_cert"], "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls, other_ca, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls, tls["ca_cert"], "superlink.example.org")


# --------------------------------------------------------------------------- host validation

@pytest.mark.parametrize("host, why", [
    ("host:8000", "without port"),
    ("http://superlink.example.org", "without a scheme"),
    ("bad host", "whitespace"),
    ("999.1.1.1", "not a valid IP address"),
    ("1.2.3", "not a valid IP address"),
    ("[::1]", "brackets"),
    ("a" * 64 + ".example.org", "64 characters, at most 63"),
    ("-lead.example.org", "not allowed"),
    ("under_score.example.org", "not allowed"),
    ("*.org", "not allowed"),
    ("exämple.org", "xn--"),
    ("example.org.", "trailing dot"),
    ("", "empty"),
])
def test_bad_hosts_are_refused_before_anything_is_written(tmp_path, host, why):
    out = tmp_path / "certs"
    with pytest.raises(ValueError, match=rf"--hosts {re.escape(repr(host))}: .*{re.escape(why)}"):
        make_ca_and_server_cert(out, ["localhost", host])
    assert not out.exists()


def test_cli_names_the_bad_host_and_exits_2(tmp_path, capsys):
    from minusfed.cli import main
    rc = main(["deploy", "certs", str(tmp_path / "c"), "--hosts", "localhost", "host:8000"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --hosts 'host:8000'" in err and "DNS name" in err
    assert "Traceback" not in err and not (tmp_path / "c").exists()


def test_long_first_host_wildcard_and_ipv6_are_accepted(tmp_path):
    long_host = "a" * 61 + ".example.org"                # 73 characters, labels <= 63
    assert len(long_host) == 73
    tls = make_ca_and_server_cert(tmp_path, [long_host, "*.sites.example.org", "::1"])
    srv = _cert(tls["server_cert"])
    cn = srv.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == SERVER_CN                               # X.509 caps a CN at 64 characters
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [long_host, "*.sites.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    _handshake(tls, tls["ca_cert"], long_host)           # TLS checks the SAN, not the CN
    _handshake(tls, tls["ca_cert"], "node1.sites.example.org")
    short = make_ca_and_server_cert(tmp_path / "short", ["superlink.example.org"])
    short_cn = _cert(short["server_cert"]).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert short_cn[0].value == "superlink.example.org"
