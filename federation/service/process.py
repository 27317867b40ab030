"""A `minusfed serve` process on a free loopback port (TLS and API tokens on unless asked
otherwise), started and stopped by its PID: what the service tests and `bench.service` run."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from federation.deploy.keys import make_ca_and_server_cert
from federation.service.auth import add_token

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`python -m minusfed.cli serve` in a subprocess; `stop()` kills exactly its PID."""

    def __init__(self, tmp: Path, server_half: Path, gallery: Path, tls: bool = True,
                 tokens: bool = True, extra: list[str] | None = None) -> None:
        self.tmp = Path(tmp)
        self.gallery = gallery
        self.port = free_port()
        self.ca = None
        self.token = None
        args = [sys.executable, "-m", "minusfed.cli", "serve", str(server_half), "--gallery",
                str(gallery), "--port", str(self.port), "--threads", "1"]
        if tls:
            certs = self.tmp / "certs"
            if not (certs / "ca.crt").exists():
                make_ca_and_server_cert(certs, hosts=["127.0.0.1", "localhost"])
            self.ca = certs / "ca.crt"
            args += ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
        if tokens:
            self.tokens_file = self.tmp / "tokens.json"
            if not self.tokens_file.exists():
                self.token = add_token(self.tokens_file, "site-a")
                (self.tmp / "token").write_text(self.token)
            self.token = (self.tmp / "token").read_text()
            args += ["--tokens", str(self.tokens_file)]
        if not (tls and tokens):
            args.append("--insecure")
        args += extra or []
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log_path = self.tmp / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        # its own process group: a service with Ray Serve replicas starts Ray's processes,
        # which stop() can then reach through the PID it started
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def wait(self, timeout: float = 120.0) -> Service:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"minusfed serve exited {self.proc.returncode}: {self.log()}")
            try:
                r = httpx.get(f"{self.url}/v1/health", verify=self.tls_context(),
                              timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"minusfed serve did not answer within {timeout} s: {self.log()}")

    def http(self, token: str | None = "default", **kw) -> httpx.Client:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers,
                            verify=self.tls_context(), timeout=60, **kw)

    def tls_context(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca else False

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL to the process group of the PID it started; the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode
