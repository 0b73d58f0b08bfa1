"""A private ``redis-server`` speaking TLS only, with a self-signed certificate made by ``openssl``.

``tls_unavailable()`` says why a TLS server cannot run here (no ``openssl`` CLI, or a
``redis-server`` built without TLS), so a test can fall back to construction-level checks.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from pathlib import Path

import redis

from worker.devstack import free_port


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (also its own CA): ``(cert, key)``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


class TlsRedis:
    """``redis-server --port 0 --tls-port P``: plain TCP is off, clients must verify ``cert``."""

    def __init__(self, datadir: Path, *, password: str) -> None:
        self.datadir = datadir
        self.password = password
        self.port = free_port()
        self.cert, self.key = make_certificate(datadir / "tls")
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, user: str = "", password: str | None = None, *, with_ca: bool = True) -> str:
        secret = self.password if password is None else password
        query = f"?ssl_ca_certs={self.cert}" if with_ca else ""
        return f"rediss://{user}:{secret}@127.0.0.1:{self.port}/0{query}"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            ssl=True,
            ssl_ca_certs=str(self.cert),
            socket_timeout=2,
            decode_responses=True,
        )

    def start(self, timeout_s: float = 20.0) -> TlsRedis:
        executable = shutil.which("redis-server")
        assert executable is not None
        with (self.datadir / "stderr.log").open("wb") as out:
            self.process = subprocess.Popen(
                [
                    executable, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                    "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
                    "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no",
                    "--requirepass", self.password, "--save", "", "--appendonly", "no",
                    "--dir", str(self.datadir), "--logfile", str(self.datadir / "redis.log"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        client = self.client()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.exceptions.RedisError, ssl.SSLError, OSError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"TLS redis-server on port {self.port} did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


def tls_unavailable(tmp_path: Path) -> str | None:
    """``None`` when a TLS redis-server can run here, else the reason it cannot."""
    if shutil.which("openssl") is None:
        return "no openssl CLI to make a certificate"
    if shutil.which("redis-server") is None:
        return "no redis-server on PATH"
    try:
        TlsRedis(tmp_path, password="probe").start().stop()
    except RuntimeError:
        errors = (tmp_path / "stderr.log").read_text(errors="replace")
        if "tls" in errors.lower() or "Bad directive" in errors:
            return f"redis-server cannot serve TLS here: {errors.strip().splitlines()[-1:]}"
        raise
    return None
