"""federation/runtime_link.py against the installed Flower and a real TLS server on 127.0.0.1.

The server closes its first N connections during the TLS handshake (what the ServerApp saw in
CI: "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol") and answers
the rest.  Flower's own retry rule gives
up at once on that error; after `harden_runtime_link` the same invoker retries and succeeds, and
a server that drops every connection still ends in an error after the bounded retries.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import httpx
import pytest

from federation.deploy.keys import make_ca_and_server_cert
from federation.runtime_link import harden_runtime_link, is_tls_eof


class DroppingTlsServer:
    """HTTPS on 127.0.0.1 that closes the first `drops` connections before the TLS handshake."""

    def __init__(self, keys: dict[str, Path], drops: int) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(keys["server_cert"], keys["server_key"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.drops, self.connections = drops, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.listener.getsockname()[1]}/"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5)
            self.connections += 1
            if self.connections <= self.drops:
                try:                         # read the ClientHello first: closing with unread
                    raw.recv(65536)          # data would send a reset instead of the EOF
                except OSError:
                    pass
                raw.close()                  # the client's handshake meets a plain TCP close
                continue
            try:
                tls = self.ctx.wrap_socket(raw, server_side=True)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                tls.unwrap()
                tls.close()
            except (OSError, ssl.SSLError):
                raw.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    return make_ca_and_server_cert(tmp_path_factory.mktemp("tls"), hosts=["127.0.0.1"])


def http_grid(keys: dict[str, Path], address: str):
    from flwr.superlink.grid.http_grid import HttpGrid
    grid = HttpGrid(runtime_api_address=address, insecure=False,
                    root_certificates=keys["ca_cert"].read_bytes(), token="test-token")
    return grid


def fetch(grid, keys, url: str) -> httpx.Response:
    """One GET through the grid's own retry invoker (what every Runtime API call goes through)."""
    with httpx.Client(verify=ssl.create_default_context(cafile=str(keys["ca_cert"]))) as client:
        return grid._retry_invoker.invoke(client.get, url)


def test_flower_gives_up_on_tls_eof_and_hardened_grid_retries(keys):
    server = DroppingTlsServer(keys, drops=1)
    try:
        grid = http_grid(keys, server.url[len("https://"):-1])
        with pytest.raises(httpx.ConnectError, match="UNEXPECTED_EOF_WHILE_READING") as caught:
            fetch(grid, keys, server.url)                      # Flower's rule: give up at once
        assert is_tls_eof(caught.value)
        assert server.connections == 1

        server.drops = 2                                       # next connection dropped too
        assert harden_runtime_link(grid)
        assert fetch(grid, keys, server.url).text == "ok"      # dropped once, retried, answered
        assert server.connections == 3
    finally:
        server.close()


def test_server_that_always_drops_still_fails(keys):
    server = DroppingTlsServer(keys, drops=10 ** 6)
    try:
        grid = http_grid(keys, server.url[len("https://"):-1])
        assert harden_runtime_link(grid, max_tls_eof_retries=2)
        grid._retry_invoker.wait_gen_factory = lambda: iter(lambda: 0.01, None)  # no backoff
        with pytest.raises(httpx.TransportError):
            fetch(grid, keys, server.url)
        assert server.connections == 3                         # 1 try + 2 retries
    finally:
        server.close()


def test_certificate_errors_are_not_retried(keys, tmp_path):
    other = make_ca_and_server_cert(tmp_path / "other", hosts=["127.0.0.1"])
    server = DroppingTlsServer(other, drops=0)                 # signed by a CA we do not trust
    try:
        grid = http_grid(keys, server.url[len("https://"):-1])
        assert harden_runtime_link(grid)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(grid, keys, server.url)
    finally:
        server.close()


def test_simulation_grid_is_left_alone():
    class InMemoryLike:
        pass
    assert harden_runtime_link(InMemoryLike()) is False
    assert not is_tls_eof(ValueError("nothing to do with TLS"))
