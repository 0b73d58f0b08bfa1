"""Local processes for the demo and the benchmarks: private redis-servers and Celery workers.

Every process started here is owned by a :class:`Stack` and stopped by :meth:`Stack.close`,
whatever happened (use it as a context manager). Nothing here talks to the shared Redis on 6379.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import redis


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """A private ``redis-server`` (from PATH) on a free port with its own data directory."""

    def __init__(self, datadir: Path, *, appendonly: bool = False) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise FileNotFoundError("redis-server is not on PATH (Debian: apt-get install redis-server)")
        self.executable = executable
        self.datadir = datadir
        self.appendonly = appendonly
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        datadir.mkdir(parents=True, exist_ok=True)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, *, timeout_s: float = 20.0) -> RedisProcess:
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.datadir),
            "--logfile",
            str(self.datadir / "redis.log"),
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.exceptions.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered (a hung Redis)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


class CeleryProcess:
    """``celery -A worker.app worker|beat`` as a subprocess, logging to a file."""

    def __init__(self, args: list[str], *, env: dict[str, str], log_path: Path) -> None:
        self.args = [sys.executable, "-m", "celery", "-A", "worker.app", *args]
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CeleryProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the prefork children too)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def stop(self, *, timeout_s: float = 15.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # any orphaned children of the group
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None


def worker_args(*, concurrency: int = 2, name: str = "billing", pool: str = "prefork") -> list[str]:
    return [
        "worker",
        "-Q",
        "billing,onboarding",
        "-c",
        str(concurrency),
        "-P",
        pool,
        "-n",
        f"{name}@%h",
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


class Stack:
    """Owns processes; :meth:`close` stops them all (workers first, Redis last)."""

    def __init__(self) -> None:
        self.redis: list[RedisProcess] = []
        self.celery: list[CeleryProcess] = []

    def add_redis(self, process: RedisProcess) -> RedisProcess:
        self.redis.append(process)
        return process.start()

    def add_celery(self, process: CeleryProcess) -> CeleryProcess:
        self.celery.append(process)
        return process.start()

    def close(self) -> None:
        for process in self.celery:
            process.stop()
        for server in self.redis:
            server.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
