"""deploy/prometheus: scrape config and alert rules."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy._support import DEPLOY, FIVE_ALARMS, HISTOGRAMS, WORKER_METRICS, load_yaml

README = DEPLOY / "README.md"


@pytest.fixture(scope="module")
def rules() -> dict[str, dict[str, Any]]:
    document = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    out: dict[str, dict[str, Any]] = {}
    for group in document["groups"]:
        for rule in group["rules"]:
            assert "alert" in rule, "recording rules are not expected here"
            assert rule["alert"] not in out, f"duplicate alert {rule['alert']}"
            out[rule["alert"]] = rule
    return out


@pytest.fixture(scope="module")
def scrape() -> dict[str, dict[str, Any]]:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_the_five_alarms_exist(rules: dict[str, dict[str, Any]]) -> None:
    assert set(rules) >= FIVE_ALARMS


def test_every_alert_has_expr_for_severity_and_runbook(rules: dict[str, dict[str, Any]]) -> None:
    for name, rule in rules.items():
        assert str(rule["expr"]).strip(), name
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["runbook"].startswith("deploy/README.md#"), name


def test_runbook_anchors_exist_in_the_readme(rules: dict[str, dict[str, Any]]) -> None:
    headings = {
        re.sub(r"[^a-z0-9_ -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in README.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }
    for name, rule in rules.items():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in headings, f"{name}: README has no heading for #{anchor}"


def test_expressions_are_balanced(rules: dict[str, dict[str, Any]]) -> None:
    for name, rule in rules.items():
        expr = str(rule["expr"])
        for open_, close in ("()", "[]", "{}"):
            assert expr.count(open_) == expr.count(close), name


def test_billing_metrics_are_the_exported_names(rules: dict[str, dict[str, Any]]) -> None:
    allowed = set(WORKER_METRICS)
    for histogram in HISTOGRAMS:
        allowed |= {f"{histogram}_bucket", f"{histogram}_count", f"{histogram}_sum"}
    for name, rule in rules.items():
        used = set(re.findall(r"\bbilling_[a-z0-9_]+", str(rule["expr"])))
        assert used <= allowed, f"{name}: unknown metrics {sorted(used - allowed)}"


def test_billing_pending_high_sums_the_backlog_gauge(rules: dict[str, dict[str, Any]]) -> None:
    expr = " ".join(str(rules["billing_pending_high"]["expr"]).split())
    assert expr.startswith("sum(") and "billing_pending" in expr
    assert re.search(r">\s*\d+$", expr)


def test_error_rate_counts_failed_tasks(rules: dict[str, dict[str, Any]]) -> None:
    expr = str(rules["error_rate"]["expr"])
    assert 'flower_events_total{type="task-failed"}' in expr
    assert rules["error_rate"]["labels"]["severity"] == "critical"


def test_desired_count_drift_fires_on_zero_and_on_two(rules: dict[str, dict[str, Any]]) -> None:
    expr = " ".join(str(rules["desired_count_drift"]["expr"]).split())
    assert 'container_label_com_docker_compose_service="beat"' in expr
    assert "or vector(0)" in expr, "no beat at all must also alarm"
    assert re.search(r"\)\s*!=\s*1$", expr), "must compare the count with != 1"


def test_corrupt_fence_is_critical(rules: dict[str, dict[str, Any]]) -> None:
    corrupt = [r for r in rules.values() if 'billing_fence_results_total{result="CORRUPT"}' in str(r["expr"])]
    assert corrupt and all(r["labels"]["severity"] == "critical" for r in corrupt)


def test_cadvisor_selectors_match_the_compose_project(rules: dict[str, dict[str, Any]]) -> None:
    project = load_yaml(DEPLOY / "docker-compose.yml")["name"]
    for name, rule in rules.items():
        for value in re.findall(r'container_label_com_docker_compose_project="([^"]+)"', str(rule["expr"])):
            assert value == project, name


def test_scrapes_workers_on_9808_and_flower_metrics(scrape: dict[str, dict[str, Any]]) -> None:
    worker = scrape["billing-worker"]
    ports = {sd.get("port") for sd in worker.get("dns_sd_configs", [])}
    targets = {t for sc in worker.get("static_configs", []) for t in sc["targets"]}
    assert 9808 in ports or any(t.endswith(":9808") for t in targets)
    assert worker.get("metrics_path", "/metrics") == "/metrics"
    flower = scrape["flower"]
    assert flower.get("metrics_path", "/metrics") == "/metrics"
    assert {t for sc in flower["static_configs"] for t in sc["targets"]} == {"flower:5555"}
    assert "basic_auth" not in flower, "Flower's /metrics is open; its credentials stay out of here"
    assert "cadvisor" in scrape


def test_expressions_parse_as_promql(rules: dict[str, dict[str, Any]]) -> None:
    """Full PromQL syntax check where the optional `promql-parser` package is installed."""
    promql_parser = pytest.importorskip("promql_parser")
    for name, rule in rules.items():
        try:
            promql_parser.parse(str(rule["expr"]))
        except Exception as error:  # the binding raises a plain ValueError-like error
            pytest.fail(f"{name}: {error}")
