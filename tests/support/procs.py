"""Helpers for tests that run the worker, Flower or the CLI as real subprocesses.

Everything here waits on a condition with a deadline (never a bare sleep as synchronisation) and
fails with a message that says what did not happen, with the tail of the process's log.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from worker.devstack import free_port

__all__ = [
    "RABBIT_HOST",
    "RABBIT_PORT",
    "client_app",
    "close_client",
    "free_port",
    "http_get",
    "kill_group",
    "log_tail",
    "port_open",
    "rabbit_vhost",
    "require_rabbitmq",
    "wait_for_port",
    "wait_until",
    "worker_env",
]

RABBIT_HOST = "127.0.0.1"
RABBIT_PORT = 5672


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout_s: float,
    what: str,
    every_s: float = 0.05,
    log: Path | None = None,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout_s``
    with ``detail()`` and the tail of ``log`` in the message."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            if log is not None:
                extra += f"\n--- {log} ---\n{log_tail(log)}"
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}{extra}")
        time.sleep(every_s)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(
    port: int,
    *,
    timeout_s: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Wait until ``port`` accepts connections; fail at once if ``process`` exited meanwhile."""

    def ready() -> bool:
        if process is not None and process.poll() is not None:
            detail = f"\n--- {log} ---\n{log_tail(log)}" if log is not None else ""
            pytest.fail(f"{what} exited with {process.returncode} before opening port {port}{detail}")
        return port_open(port)

    wait_until(ready, timeout_s=timeout_s, what=f"{what} on port {port}", log=log)


def log_tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def http_get(url: str, *, headers: dict[str, str] | None = None, timeout_s: float = 5.0) -> tuple[int, str]:
    """``(status, body)`` of a GET; HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def set_cli_env(
    monkeypatch: pytest.MonkeyPatch, *, env_name: str, state_url: str, wal_dir: Path, partitions: int
) -> dict[str, str]:
    """BILLING_* for the CLI and in-process runtimes of one test (no broker: unreachable URLs),
    set with ``monkeypatch`` and the settings cache cleared; returns what was set."""
    from worker.settings import get_settings

    values = {
        "BILLING_ENV": env_name,
        "BILLING_REDIS_URL": state_url,
        "BILLING_BROKER_URL": "redis://127.0.0.1:1/0",  # the CLI needs no broker except for enqueue
        "BILLING_RESULT_BACKEND": "redis://127.0.0.1:1/1",
        "BILLING_WAL_DIR": str(wal_dir),
        "BILLING_PARTITIONS": str(partitions),
        "BILLING_REDIS_TIMEOUT_MS": "300",
        "BILLING_BREAKER_RESET_MS": "200",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return values


def worker_env(
    *,
    tmp_path: Path,
    state_url: str,
    broker_url: str,
    result_backend: str,
    env_name: str = "sub",
    partitions: int = 4,
    metrics_port: int = 0,
    **extra: str,
) -> dict[str, str]:
    """The environment of a subprocess worker (as worker/demo.py builds it): private Redis
    servers, a tmp WAL dir and a tmp Prometheus multiprocess dir."""
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        {
            "BILLING_ENV": env_name,
            "BILLING_REDIS_URL": state_url,
            "BILLING_BROKER_URL": broker_url,
            "BILLING_RESULT_BACKEND": result_backend,
            "BILLING_WAL_DIR": str(tmp_path / "wal"),
            "BILLING_PARTITIONS": str(partitions),
            "BILLING_REDIS_TIMEOUT_MS": "500",
            "BILLING_RETRY_MAX_S": "1",
            "BILLING_METRICS_PORT": str(metrics_port),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
    )
    env.update(extra)
    return env


def client_app(broker_url: str, result_backend: str) -> Celery:
    """A send-only Celery app with the worker's serialisation and routing, apart from the global
    ``worker.app.app`` (which other tests configure for their in-process worker)."""
    from worker.app import celery_config
    from worker.settings import Settings

    settings = Settings(broker_url=broker_url, result_backend=result_backend)
    app = Celery(f"client-{uuid.uuid4().hex[:8]}", set_as_current=False)
    config = celery_config(settings)
    config.pop("beat_schedule")
    # An AsyncResult collected after its backend server stopped gives up at once, not after ~20 s.
    config["result_backend_transport_options"] = {
        "retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.05, "interval_max": 0.05}
    }
    app.conf.update(config)
    return app


def close_client(app: Celery) -> None:
    """Close a client app while its result backend still runs. AsyncResult objects sit in
    reference cycles; collected after the backend stopped, each ``__del__`` would retry the
    result store for many seconds (and hang the session's end)."""
    gc.collect()
    app.close()


def require_rabbitmq() -> None:
    """Fail (never skip) with a clear message when RabbitMQ is not reachable."""
    if not port_open(RABBIT_PORT, RABBIT_HOST):
        pytest.fail(
            f"RabbitMQ is not reachable on {RABBIT_HOST}:{RABBIT_PORT}: these tests need a real broker "
            "(Debian: apt-get install rabbitmq-server && service rabbitmq-server start)"
        )


def _rabbitmqctl(*args: str) -> None:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")


@contextlib.contextmanager
def rabbit_vhost(prefix: str = "billing-test") -> Iterator[str]:
    """A fresh RabbitMQ vhost (guest has all permissions on it), deleted afterwards."""
    require_rabbitmq()
    name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


def kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal a process started with ``start_new_session=True`` and every process in its group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
