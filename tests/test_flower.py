"""Flower on the worker's app (``celery -A worker.app flower``) with basic auth, as deployed:
``/metrics`` and ``/healthcheck`` are open (Prometheus scrapes them), the UI and ``/api/*`` are not.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import free_port, http_get, kill_group, log_tail, wait_for_port, worker_env
from tests.support.redis_server import RedisServer

USER, SECRET = "ops", "fl0wer-s3cret"


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    tmp_path = tmp_path_factory.mktemp("flower")
    broker = RedisServer(tmp_path / "broker").start()
    port = free_port()
    env = worker_env(
        tmp_path=tmp_path,
        state_url=broker.url,
        broker_url=broker.url,
        result_backend=broker.url.replace("/0", "/1"),
        env_name="flower",
    )
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "flower",
                "--address=127.0.0.1",
                f"--port={port}",
                f"--basic-auth={USER}:{SECRET}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, timeout_s=30, what="flower", process=process, log=log)
        yield port, log
    finally:
        kill_group(process)
        process.wait(timeout=10)
        broker.stop()


def test_metrics_and_healthcheck_are_open(flower: tuple[int, Path]) -> None:
    port, log = flower
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, log_tail(log)
    assert "# HELP flower_events_total" in body
    status, body = http_get(f"http://127.0.0.1:{port}/healthcheck")
    assert (status, body.strip()) == (200, "OK")


@pytest.mark.parametrize("path", ["/api/workers", "/api/tasks", "/"])
def test_api_and_ui_need_credentials(flower: tuple[int, Path], path: str) -> None:
    port, _ = flower
    status, _body = http_get(f"http://127.0.0.1:{port}{path}")
    assert status == 401
    status, _body = http_get(f"http://127.0.0.1:{port}{path}", headers=_basic(USER, "wrong"))
    assert status == 401
    status, _body = http_get(f"http://127.0.0.1:{port}{path}", headers=_basic("intruder", SECRET))
    assert status == 401


def test_api_answers_with_credentials(flower: tuple[int, Path]) -> None:
    port, log = flower
    status, body = http_get(f"http://127.0.0.1:{port}/api/workers", headers=_basic(USER, SECRET))
    assert status == 200, log_tail(log)
    assert body.strip().startswith("{")
    status, _ = http_get(f"http://127.0.0.1:{port}/api/tasks", headers=_basic(USER, SECRET))
    assert status == 200


def test_secret_is_not_logged(flower: tuple[int, Path]) -> None:
    port, log = flower
    http_get(f"http://127.0.0.1:{port}/api/workers", headers=_basic(USER, "wrong-guess"))
    text = log.read_text(errors="replace")
    assert SECRET not in text
    assert "wrong-guess" not in text
