"""deploy/docker-compose.yml: parsed with PyYAML (no Docker engine here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from tests.deploy._support import DEPLOY, load_yaml
from worker.settings import ENV_PREFIX, Settings

COMPOSE = DEPLOY / "docker-compose.yml"
SETTINGS_VARS = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
INTERPOLATION = re.compile(r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = load_yaml(COMPOSE)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def command(service: dict[str, Any]) -> list[str]:
    value = service.get("command", [])
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def replicas(service: dict[str, Any]) -> int:
    return int(service.get("deploy", {}).get("replicas", 1))


def celery_role(service: dict[str, Any]) -> str | None:
    """``worker``/``beat``/``flower`` for ``celery -A worker.app <role>``."""
    cmd = command(service)
    if cmd[:3] == ["celery", "-A", "worker.app"] and len(cmd) > 3:
        return cmd[3]
    return None


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "worker", "beat", "flower", "prometheus"} <= set(services)


def test_redis_has_aof_everysec_and_a_named_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    cmd = command(redis)
    pairs = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "redis-server"
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    volume = next(v.split(":")[0] for v in redis["volumes"] if v.endswith(":/data"))
    assert volume in compose["volumes"], "redis /data must be a named volume"


def test_redis_password_comes_from_the_environment(services: dict[str, dict[str, Any]]) -> None:
    cmd = command(services["redis"])
    password = cmd[cmd.index("--requirepass") + 1]
    match = INTERPOLATION.fullmatch(password)
    assert match and match.group("op") == ":?", password


def test_flower_basic_auth_comes_from_the_environment(services: dict[str, dict[str, Any]]) -> None:
    flower = [s for s in services.values() if celery_role(s) == "flower"]
    assert len(flower) == 1
    auth = [arg for arg in command(flower[0]) if arg.startswith("--basic-auth")]
    assert len(auth) == 1, "Flower must run with --basic-auth"
    value = auth[0].split("=", 1)[1]
    match = INTERPOLATION.fullmatch(value)
    assert match, f"--basic-auth must be exactly one ${{VAR}} reference, got {value!r}"
    assert match.group("var") == "FLOWER_BASIC_AUTH"
    # `:?` makes compose refuse to start without credentials: never an open API.
    assert match.group("op") == ":?"


def test_exactly_one_beat(services: dict[str, dict[str, Any]]) -> None:
    beats = [s for s in services.values() if celery_role(s) == "beat"]
    assert len(beats) == 1
    assert replicas(beats[0]) == 1


def test_two_workers_share_one_wal_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    workers = [s for s in services.values() if celery_role(s) == "worker"]
    assert sum(replicas(s) for s in workers) == 2
    wal_sources = set()
    for worker in workers:
        cmd = command(worker)
        assert cmd[cmd.index("-Q") + 1] == "billing,onboarding"
        wal_dir = environment(worker)["BILLING_WAL_DIR"]
        mounts = [v for v in worker["volumes"] if v.split(":")[1] == wal_dir]
        assert len(mounts) == 1, "the worker must mount a volume at BILLING_WAL_DIR"
        wal_sources.add(mounts[0].split(":")[0])
    # One WAL per host: every process that may take a partition's lease sees the same directory
    # and the same fcntl locks (deploy/README.md, "WAL volume and partitions").
    assert len(wal_sources) == 1
    assert wal_sources <= set(compose["volumes"])


def test_worker_environment_is_a_valid_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(services["worker"])
    required = {
        "BILLING_ENV",
        "BILLING_REDIS_URL",
        "BILLING_BROKER_URL",
        "BILLING_RESULT_BACKEND",
        "BILLING_WAL_DIR",
        "BILLING_PARTITIONS",
        "BILLING_METRICS_PORT",
    }
    assert required <= set(env)

    def interpolate(match: re.Match[str]) -> str:
        if match.group("op") in {":-", "-"}:
            return match.group("arg")
        return "s3cret"  # a required secret, as an operator's .env would set it

    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"{ENV_PREFIX}{name.upper()}", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, INTERPOLATION.sub(interpolate, value))
    settings = Settings()
    assert settings.metrics_port == 9808
    assert str(settings.wal_dir) == "/var/lib/billing/wal"
    assert settings.redis_url.startswith("redis://:s3cret@redis:6379/")
    assert len({settings.redis_url, settings.broker_url, settings.result_backend}) == 3


def test_every_billing_variable_is_a_settings_field(services: dict[str, dict[str, Any]]) -> None:
    used = set(re.findall(r"\bBILLING_[A-Z0-9_]+", COMPOSE.read_text(encoding="utf-8")))
    for service in services.values():
        used |= {key for key in environment(service) if key.startswith(ENV_PREFIX)}
    assert used, "no BILLING_* variable in docker-compose.yml"
    assert used <= SETTINGS_VARS, f"not Settings fields: {sorted(used - SETTINGS_VARS)}"


def test_no_literal_secrets(services: dict[str, dict[str, Any]]) -> None:
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|CREDENTIAL", re.IGNORECASE)
    for name, service in services.items():
        for key, value in environment(service).items():
            for url_password in re.findall(r"://[^:/@\s]*:([^@\s]*)@", value):
                assert INTERPOLATION.fullmatch(url_password), f"{name}.{key}: literal password in URL"
            if secretish.search(key):
                assert INTERPOLATION.fullmatch(value), f"{name}.{key} must come from the environment"
        for arg in command(service):
            for url_password in re.findall(r"://[^:/@\s]*:([^@\s]*)@", arg):
                assert INTERPOLATION.fullmatch(url_password), f"{name}: literal password in command"
    for match in INTERPOLATION.finditer(COMPOSE.read_text(encoding="utf-8")):
        if secretish.search(match.group("var")):
            assert match.group("op") == ":?", f"{match.group(0)}: a secret needs no default"


def test_prometheus_mounts_its_config_and_the_rules(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"
    for source in mounts.values():
        if source.startswith("."):
            assert (DEPLOY / source).is_file(), source
    assert "--config.file=/etc/prometheus/prometheus.yml" in command(prometheus)
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert "/etc/prometheus/alerts.yml" in config["rule_files"]


def test_flower_and_prometheus_are_published_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def test_images_built_from_the_deploy_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    for service in services.values():
        if celery_role(service):
            build = service["build"]
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
            assert context == Path(DEPLOY).parent.resolve()
