"""BILLING_* settings: defaults, and one clear line naming the variable for a bad value."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError
from worker.settings import load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BILLING_ENV", "BILLING_PARTITIONS", "BILLING_MAX_CREDIT_BALANCE"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.max_credit_balance == 1_000_000_000_000
    assert settings.credit_ttl_seconds == 604_800
    assert settings.retry_max_s == 30
    assert settings.wal_fsync == "always"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BILLING_PARTITIONS", "0"),
        ("BILLING_PARTITIONS", "eight"),
        ("BILLING_ENV", "prod:eu"),
        ("BILLING_ENV", "a{b}"),
        ("BILLING_MAX_CREDIT_BALANCE", "9007199254740992"),
        ("BILLING_MAX_CREDIT_BALANCE", "1.5"),
        ("BILLING_WAL_FSYNC", "sometimes"),
        ("BILLING_REDIS_TIMEOUT_MS", "-5"),
        ("BILLING_METRICS_PORT", "70000"),
    ],
)
def test_bad_value_names_the_variable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message


def test_retry_cap_must_stay_below_visibility_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_RETRY_MAX_S", "400")
    monkeypatch.setenv("BILLING_VISIBILITY_TIMEOUT_S", "300")
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "retry_max_s must stay below visibility_timeout_s" in str(error.value)


def test_url_values_are_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_REDIS_URL", "redis://u:hunter2@h:1/0")
    monkeypatch.setenv("BILLING_PARTITIONS", "0")
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "hunter2" not in str(error.value)
