"""Credentials: password-protected Redis and ACL users work, and no password ever leaks.

The state Redis runs with ``requirepass`` and an ACL user ``billing`` (``~* +@all``); the broker
Redis with ``requirepass`` and an ACL user ``celery`` (``~* &* +@all``: Celery's result backend and
remote control use pub/sub, and Redis 7 gives a new ACL user no channel by default). Every
password is then looked for in worker logs, task results, metric labels, CLI output, error
messages and ConfigError messages. ``rediss://`` is checked against a real TLS redis-server when
this machine can run one, and at connection-construction level always.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from tests.support.procs import (
    client_app,
    close_client,
    free_port,
    http_get,
    log_tail,
    set_cli_env,
    wait_for_port,
    worker_env,
)
from tests.support.redis_server import RedisServer
from tests.support.tls_redis import TlsRedis, tls_unavailable
from worker.devstack import CeleryProcess, worker_args
from worker.errors import ConfigError, RedisUnavailable
from worker.redaction import redact_url
from worker.samples import entry, wallet_address

ADMIN_PW = "Adm1n-pass-QX7"  # requirepass (default user) of the state Redis
STATE_PW = "St4te-pass-ZK9"  # ACL user `billing` on the state Redis
BROKER_ADMIN_PW = "Br0ker-admin-PL2"
BROKER_PW = "Br0ker-user-MN4"  # ACL user `celery` on the broker Redis
WRONG_PW = "Wr0ng-guess-HT5"
SECRETS = (ADMIN_PW, STATE_PW, BROKER_ADMIN_PW, BROKER_PW, WRONG_PW)

W1 = wallet_address(1)


def assert_clean(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} contains a password: {text[:2000]}"


def acl_user(server: RedisServer, user: str, password: str, *rules: str) -> str:
    server.client().execute_command("ACL", "SETUSER", user, "on", f">{password}", *rules)
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


@pytest.fixture
def state_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "state", password=ADMIN_PW).start()
    yield server
    server.stop()


@pytest.fixture
def state_url(state_server: RedisServer) -> str:
    return acl_user(state_server, "billing", STATE_PW, "~*", "+@all")


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path / "broker", password=BROKER_ADMIN_PW).start()
    yield acl_user(server, "celery", BROKER_PW, "~*", "&*", "+@all")
    server.stop()


@pytest.fixture
def cli_env(tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """BILLING_* for the CLI and in-process runtimes: the ACL user on the state Redis."""
    return set_cli_env(monkeypatch, env_name="sec", state_url=state_url, wal_dir=tmp_path / "wal", partitions=2)


def _runtime() -> Any:
    from worker.runtime import build_runtime
    from worker.settings import load_settings

    return build_runtime(load_settings())


# --- a real worker with ACL users on both Redis servers ----------------------------------------------


def test_worker_with_acl_users_credits_and_leaks_no_password(
    tmp_path: Path, state_server: RedisServer, state_url: str, broker_url: str
) -> None:
    port = free_port()
    env = worker_env(
        tmp_path=tmp_path,
        state_url=state_url,
        broker_url=broker_url,
        result_backend=broker_url.replace("/0", "/1"),
        env_name="sec",
        metrics_port=port,
        BILLING_REDIS_TIMEOUT_MS="300",
    )
    args = worker_args(concurrency=1, name="sec")
    args[args.index("--loglevel") + 1] = "INFO"
    log = tmp_path / "worker.log"
    worker = CeleryProcess(args, env=env, log_path=log).start()
    app = client_app(env["BILLING_BROKER_URL"], env["BILLING_RESULT_BACKEND"])
    try:
        assert worker.process is not None
        wait_for_port(port, timeout_s=30, what="the worker's metrics server", process=worker.process, log=log)
        sent = [
            entry("s-1", W1, 1_000, 250),
            entry("s-2", W1, 100, 100),
            {**entry("s-3", W1, 10, 1), "wallet": "0xnot-a-wallet"},
        ]
        results = [app.send_task("billing.process_entry", args=[p]).get(timeout=30) for p in sent]
        assert [r["status"] for r in results] == ["credited", "no_credit", "rejected"], log_tail(log)
        assert results[0]["balance"] == "750"
        # The state Redis goes away: the entry fails open to the WAL; the answer names no URL.
        state_server.kill()
        deferred = app.send_task("billing.process_entry", args=[entry("s-4", W1, 500, 0)]).get(timeout=30)
        assert deferred["status"] == "deferred", log_tail(log)
        assert_clean(json.dumps([*results, deferred]), "task results")

        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "billing_entries_total" in body
        assert_clean(body, "the metrics page")
    finally:
        worker.stop()
        close_client(app)
    text = log.read_text(errors="replace")
    assert "redis://celery:**@127.0.0.1" in text, "the log should show the broker URL (redacted)"
    assert "succeeded" in text  # INFO task lines, results included, were logged
    assert_clean(text, "the worker log")


# --- in-process: the pipeline, its logs and its errors ----------------------------------------------


def test_pipeline_logs_and_errors_leak_no_password(
    cli_env: dict[str, str], state_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    runtime = _runtime()
    try:
        assert runtime.state.client.execute_command("ACL", "WHOAMI") == "billing"
        assert runtime.pipeline.process_entry(entry("p-1", W1, 900, 100)).status.value == "credited"
        state_server.kill()
        outcome = runtime.pipeline.process_entry(entry("p-2", W1, 900, 100))
        assert outcome.status.value == "deferred"
        assert_clean(json.dumps(outcome.to_result()), "the deferred result")
        with pytest.raises(RedisUnavailable) as unavailable:
            runtime.state.call(runtime.state.client.ping)
        message = str(unavailable.value)
        assert "billing:***@127.0.0.1" in message  # names the server, masks the password
        assert_clean(message, "RedisUnavailable")
        consumed = runtime.pipeline.apply_credit({"request_id": "r-1", "wallet": W1, "required_amount": "5"})
        assert consumed.status == "unavailable"
        assert_clean(json.dumps(consumed.to_result()), "the apply_credit result")
    finally:
        runtime.close()
    assert caplog.records, "expected log records from the outage"
    for record in caplog.records:
        assert_clean(record.getMessage(), f"log record {record.name}")
    assert_clean(caplog.text, "captured log")


# --- the CLI ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["fence", "show"], ["balance", W1], ["replay"], ["rebuild"]])
def test_cli_output_has_no_password(cli_env: dict[str, str], args: list[str]) -> None:
    from worker.cli import cli

    _runtime().close()  # creates the WAL directory of the environment
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert_clean(result.output, f"`billing-worker {' '.join(args)}`")


@pytest.mark.parametrize("args", [["fence", "show"], ["balance", W1], ["replay"], ["rebuild"]])
def test_cli_wrong_password_is_one_line_exit_2_without_any_password(
    cli_env: dict[str, str], state_server: RedisServer, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    from worker.cli import cli

    _runtime().close()
    monkeypatch.setenv("BILLING_REDIS_URL", f"redis://billing:{WRONG_PW}@127.0.0.1:{state_server.port}/0")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "AuthenticationError" in lines[0] and "BILLING_REDIS_URL" in lines[0]
    assert "billing:***@" in lines[0]
    assert_clean(result.output, "the CLI error")


# --- ConfigError and start-up -------------------------------------------------------------------------

#: URLs a hurried operator writes: passwords with reserved characters left unencoded, a bad port.
#: Each fragment of the password must stay out of every message.
BAD_URLS = [
    ("BILLING_REDIS_URL", "redis://billing:Sl4sh/Secr3t@127.0.0.1:6379/0", ("Sl4sh", "Secr3t")),
    ("BILLING_REDIS_URL", "redis://billing:H4sh#Secr3t@127.0.0.1:6379/0", ("H4sh", "Secr3t")),
    ("BILLING_REDIS_URL", "redis://billing:1234/Secr3t@127.0.0.1/0", ("1234/", "Secr3t")),
    ("BILLING_REDIS_URL", "http://billing:Plain-Secr3t@127.0.0.1:6379/0", ("Plain-Secr3t",)),
    ("BILLING_REDIS_URL", "redis://billing:Port-Secr3t@127.0.0.1:63x9/0", ("Port-Secr3t",)),
    ("BILLING_BROKER_URL", "amqp://guest:Sl4sh/Secr3t@127.0.0.1:5672//", ("Sl4sh", "Secr3t")),
    ("BILLING_RESULT_BACKEND", "redis://:Q?Secr3t@127.0.0.1:6379/1", ("Secr3t",)),
]


@pytest.mark.parametrize(("name", "url", "fragments"), BAD_URLS)
def test_config_error_names_the_variable_and_hides_the_value(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str, url: str, fragments: tuple[str, ...]
) -> None:
    from worker.cli import cli
    from worker.settings import load_settings

    monkeypatch.setenv(name, url)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith(f"{name}: ") and "\n" not in message
    assert all(fragment not in message for fragment in fragments), message

    result = CliRunner().invoke(cli, ["balance", W1])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: {message}"]
    assert all(fragment not in result.output for fragment in fragments)


def test_worker_start_up_with_a_bad_url_is_one_line_exit_2(tmp_path: Path) -> None:
    """``celery -A worker.app ...`` imports worker.app first: a bad URL stops it right there."""
    env = worker_env(
        tmp_path=tmp_path,
        state_url="redis://billing:Sl4sh/Secr3t@127.0.0.1:6379/0",
        broker_url="redis://127.0.0.1:1/0",
        result_backend="redis://127.0.0.1:1/1",
    )
    done = subprocess.run(
        [sys.executable, "-c", "import worker.app"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "billing-worker: BILLING_REDIS_URL: not a valid URL (a port that is not a number, or an unencoded "
        "reserved character) (the value is not shown: it may hold a password)"
    ]
    assert "Secr3t" not in done.stderr + done.stdout and "Sl4sh" not in done.stderr + done.stdout


def test_other_config_errors_never_quote_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import load_settings

    monkeypatch.setenv("BILLING_REDIS_URL", f"redis://billing:{STATE_PW}@127.0.0.1:6379/0")
    monkeypatch.setenv("BILLING_BROKER_URL", f"redis://celery:{BROKER_PW}@127.0.0.1:6379/0")
    for name, value in (("BILLING_PARTITIONS", "0"), ("BILLING_RETRY_MAX_S", "900"), ("BILLING_ENV", "a b")):
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            with pytest.raises(ConfigError) as error:
                load_settings()
        assert_clean(str(error.value), f"ConfigError for {name}")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:secret@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://:secret@h/0", "redis://:***@h/0"),
        ("rediss://u:secret@h:6380/0?ssl_ca_certs=/ca.pem", "rediss://u:***@h:6380/0?ssl_ca_certs=/ca.pem"),
        ("amqp://guest:secret@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
        ("redis://u:se@cret@h:1/0", "redis://u:***@h:1/0"),
        ("redis://u:1234/secret@h", "redis://***@h"),  # was returned whole before
        ("redis://u:sec/ret@h:1/0", "<unparseable url>"),  # raised ValueError before
        ("redis://u:secret@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "secret" not in redact_url(url) and "cret" not in redact_url(url)


# --- rediss:// ------------------------------------------------------------------------------------------


def test_rediss_url_builds_a_verifying_ssl_connection() -> None:
    from worker.settings import Settings
    from worker.state_redis import StateRedis, connect

    url = f"rediss://billing:{STATE_PW}@state.example:6380/3?ssl_ca_certs=/etc/ca.pem"
    settings = Settings(redis_url=url)
    assert settings.redis_url == url
    client = connect(settings.redis_url, timeout_ms=250)
    pool = client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("state.example", 6380, 3)
    assert (kwargs["username"], kwargs["password"]) == ("billing", STATE_PW)
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25
    connection = pool.make_connection()
    assert isinstance(connection, redis.SSLConnection)
    assert connection.cert_reqs == ssl.CERT_REQUIRED  # verifies the server by default
    state = StateRedis.from_settings(settings)
    assert state._label == "rediss://billing:***@state.example:6380/3?ssl_ca_certs=/etc/ca.pem"
    assert redis.Redis.from_url("redis://h:1/0").connection_pool.connection_class is redis.Connection


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    reason = tls_unavailable(tmp_path / "probe")
    if reason is not None:  # the construction-level test above still runs
        pytest.skip(reason)
    server = TlsRedis(tmp_path / "tls-redis", password=ADMIN_PW).start()
    client = server.client()
    client.execute_command("ACL", "SETUSER", "billing", "on", f">{STATE_PW}", "~*", "+@all")
    client.close()
    yield server
    server.stop()


def test_pipeline_and_cli_over_real_tls(
    tls_redis: TlsRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.cli import cli
    from worker.settings import get_settings

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("BILLING_ENV", "tls")
    monkeypatch.setenv("BILLING_WAL_DIR", str(tmp_path / "wal"))
    monkeypatch.setenv("BILLING_PARTITIONS", "2")
    monkeypatch.setenv("BILLING_REDIS_TIMEOUT_MS", "1000")
    monkeypatch.setenv("BILLING_REDIS_URL", tls_redis.url("billing", STATE_PW))
    get_settings.cache_clear()
    runtime = _runtime()
    try:
        assert runtime.state.client.execute_command("ACL", "WHOAMI") == "billing"
        assert isinstance(runtime.state.client.connection_pool.get_connection(), redis.SSLConnection)
        first = runtime.pipeline.process_entry(entry("t-1", W1, 5_000, 1_000))
        assert (first.status.value, first.amount, first.balance) == ("credited", 4_000, 4_000)
        assert runtime.pipeline.process_entry(entry("t-1", W1, 5_000, 1_000)).status.value == "duplicate"
    finally:
        runtime.close()
    shown = CliRunner().invoke(cli, ["balance", W1])
    assert (shown.exit_code, shown.output.split()) == (0, [W1, "4000"])

    # Without the CA the server's certificate does not verify: an outage, named without the password.
    monkeypatch.setenv("BILLING_REDIS_URL", tls_redis.url("billing", STATE_PW, with_ca=False))
    refused = CliRunner().invoke(cli, ["balance", W1])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert "rediss://billing:***@127.0.0.1" in refused.output
    # Plain TCP to the TLS port is refused the same way.
    monkeypatch.setenv("BILLING_REDIS_URL", f"redis://billing:{STATE_PW}@127.0.0.1:{tls_redis.port}/0")
    plain = CliRunner().invoke(cli, ["balance", W1])
    assert plain.exit_code == 2 and len(plain.output.strip().splitlines()) == 1, plain.output
    assert_clean(refused.output + plain.output + caplog.text, "TLS errors")
