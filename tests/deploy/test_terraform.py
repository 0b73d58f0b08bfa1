"""deploy/terraform: parsed with python-hcl2 (no terraform binary, no AWS here)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy._support import (
    FIVE_ALARMS,
    TERRAFORM,
    alarm_fires,
    iter_statements,
    jsonencoded,
    labelled,
    load_terraform,
    metric_math,
    number,
    re2_to_python,
    resolve_local,
    terraform_accepts,
    tf_locals,
    validation_regexes,
    variables,
)

KMS_VAR = "${var.kms_key_arn}"
GOOD_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.fixture(scope="module")
def tf() -> dict[str, list[Any]]:
    return load_terraform()


@pytest.fixture(scope="module")
def alarms(tf: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    return labelled(tf, "resource", "aws_cloudwatch_metric_alarm")


def test_required_files_exist_and_parse(tf: dict[str, list[Any]]) -> None:
    for name in ("versions.tf", "variables.tf", "main.tf", "outputs.tf"):
        assert (TERRAFORM / name).is_file(), name
    assert tf["terraform"][0]["required_providers"][0]["aws"]["source"] == "hashicorp/aws"
    assert tf["output"], "outputs.tf declares no output"


# --- KMS ---------------------------------------------------------------------------------------


def _kms_statements(tf: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name, doc in labelled(tf, "data", "aws_iam_policy_document").items():
        for statement in iter_statements(doc):
            actions = statement.get("actions", []) + statement.get("not_actions", [])
            if any(str(action).lower().startswith("kms:") for action in actions):
                found.append((name, statement))
    return found


def test_every_kms_statement_is_decrypt_on_exactly_the_key_variable(tf: dict[str, list[Any]]) -> None:
    statements = _kms_statements(tf)
    assert statements, "no policy statement grants kms:Decrypt"
    for name, statement in statements:
        assert statement.get("effect", "Allow") == "Allow", name
        assert statement["actions"] == ["kms:Decrypt"], name
        assert statement["resources"] == [KMS_VAR], f"{name}: {statement['resources']}"
        assert "not_actions" not in statement and "not_resources" not in statement, name
        assert "*" not in str(statement["resources"]), name


def test_task_role_policy_grants_kms_decrypt_on_the_key(tf: dict[str, list[Any]]) -> None:
    task_docs = set()
    for policy in labelled(tf, "resource", "aws_iam_role_policy").values():
        if policy["role"] == "${aws_iam_role.task.id}":
            match = re.fullmatch(r"\$\{data\.aws_iam_policy_document\.(\w+)\.json\}", policy["policy"])
            assert match, policy["policy"]
            task_docs.add(match.group(1))
    assert task_docs, "no inline policy on aws_iam_role.task"
    granting = [name for name, statement in _kms_statements(tf) if name in task_docs]
    assert granting, "the task role cannot kms:Decrypt"
    task_def_roles = {
        body["task_role_arn"] for body in labelled(tf, "resource", "aws_ecs_task_definition").values()
    }
    assert task_def_roles == {"${aws_iam_role.task.arn}"}


def test_no_kms_wildcard_anywhere() -> None:
    for path in TERRAFORM.glob("*.tf"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r'"kms:\*"|"kms:[A-Za-z]*\*', text), path.name
        assert "alias/" not in text.replace("alias/...", ""), path.name


def test_kms_key_arn_has_no_default(tf: dict[str, list[Any]]) -> None:
    assert "default" not in variables(tf)["kms_key_arn"]


@pytest.fixture(scope="module")
def kms_patterns(tf: dict[str, list[Any]]) -> list[re.Pattern[str]]:
    patterns = validation_regexes(variables(tf)["kms_key_arn"], "kms_key_arn")
    assert patterns, "kms_key_arn has no validation"
    return patterns


@pytest.mark.parametrize(
    "arn",
    [
        GOOD_KEY,
        "arn:aws:kms:eu-central-1:000000000000:key/00000000-0000-0000-0000-000000000000",
        "arn:aws:kms:ap-southeast-2:210987654321:key/abcdef01-2345-6789-abcd-ef0123456789",
        "arn:aws:kms:us-gov-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    ],
)
def test_kms_key_arn_validation_accepts_key_arns(kms_patterns: list[re.Pattern[str]], arn: str) -> None:
    assert terraform_accepts(kms_patterns, arn)


@pytest.mark.parametrize(
    "arn",
    [
        "*",
        "",
        "arn:aws:kms:*:123456789012:key/*",
        "arn:aws:kms:us-east-1:123456789012:key/*",
        "arn:aws:kms:us-east-1:123456789012:*",
        "arn:aws:kms:us-east-1:123456789012:alias/foo",
        "arn:aws:kms:us-east-1:123456789012:alias/aws/sns",
        "arn:aws:kms:us-east-1:123456789012:alias/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-east-1:************:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-east-1:12345678901*:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-*",
        "arn:aws:kms:us-east-?:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890a?",
        "arn:aws:kms:*:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-east-1:*:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-east-1:12345678901:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-east-1:1234567890123:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-east-1:123456789012:key/not-a-uuid",
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd12ab34cd56ef1234567890ab",
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890a",
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890abc",
        "arn:aws:kms:us-east-1:123456789012:key/1234ABCD-12AB-34CD-56EF-1234567890AB-x",
        GOOD_KEY + "x",
        GOOD_KEY + "/extra",
        GOOD_KEY + ",arn:aws:kms:us-east-1:123456789012:key/*",
        GOOD_KEY + "\n",
        " " + GOOD_KEY,
        "x" + GOOD_KEY,
        "arn:aws:s3:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab*",
        "arn:aws:kms:US-EAST-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    ],
)
def test_kms_key_arn_validation_rejects(kms_patterns: list[re.Pattern[str]], arn: str) -> None:
    assert not terraform_accepts(kms_patterns, arn)


def test_kms_key_arn_validation_rejects_a_wildcard_anywhere(kms_patterns: list[re.Pattern[str]]) -> None:
    for i in range(len(GOOD_KEY) + 1):
        for wildcard in ("*", "?"):
            replaced = GOOD_KEY[:i] + wildcard + GOOD_KEY[i + 1 :]
            inserted = GOOD_KEY[:i] + wildcard + GOOD_KEY[i:]
            assert not terraform_accepts(kms_patterns, replaced), replaced
            assert not terraform_accepts(kms_patterns, inserted), inserted


def test_re2_translation_keeps_end_of_text_semantics() -> None:
    # RE2 `$` (no multi-line flag) matches only at the end; Python's would accept a final newline.
    assert re2_to_python("^a$").search("a\n") is None
    assert re2_to_python("^[[:digit:]]{2}$").search("42")
    assert re2_to_python("^[^@[:space:]]+$").search("a b") is None


def test_every_variable_regex_validation_compiles(tf: dict[str, list[Any]]) -> None:
    for name, variable in variables(tf).items():
        for validation in variable.get("validation", []):
            if validation["condition"].startswith("${can(regex("):
                validation_regexes(variable, name)


# --- SNS ---------------------------------------------------------------------------------------


def test_alarm_topic_is_kms_encrypted(tf: dict[str, list[Any]]) -> None:
    topics = labelled(tf, "resource", "aws_sns_topic")
    assert set(topics) == {"alarms"}
    assert topics["alarms"]["kms_master_key_id"] == KMS_VAR


def test_email_subscription_is_optional(tf: dict[str, list[Any]]) -> None:
    subscriptions = labelled(tf, "resource", "aws_sns_topic_subscription")
    assert set(subscriptions) == {"alarm_email"}
    subscription = subscriptions["alarm_email"]
    count = re.sub(r"\s+", " ", subscription["count"])
    assert count == '${var.alarm_email == "" ? 0 : 1}'
    assert subscription["protocol"] == "email"
    assert subscription["endpoint"] == "${var.alarm_email}"
    assert subscription["topic_arn"] == "${aws_sns_topic.alarms.arn}"
    assert variables(tf)["alarm_email"]["default"] == ""


# --- alarms ------------------------------------------------------------------------------------


def test_exactly_the_five_alarms(alarms: dict[str, dict[str, Any]]) -> None:
    assert set(alarms) == FIVE_ALARMS
    for name, alarm in alarms.items():
        assert alarm["alarm_name"].endswith(name), alarm["alarm_name"]


def test_every_alarm_notifies_the_topic_on_alarm_and_ok(alarms: dict[str, dict[str, Any]]) -> None:
    for name, alarm in alarms.items():
        assert alarm.get("alarm_actions") == ["${aws_sns_topic.alarms.arn}"], name
        assert alarm.get("ok_actions") == ["${aws_sns_topic.alarms.arn}"], name


def test_every_alarm_says_how_to_treat_missing_data(alarms: dict[str, dict[str, Any]]) -> None:
    for name, alarm in alarms.items():
        assert alarm.get("treat_missing_data") in {"breaching", "notBreaching", "ignore", "missing"}, name


def test_every_alarm_points_to_its_runbook(alarms: dict[str, dict[str, Any]]) -> None:
    for name, alarm in alarms.items():
        assert f"deploy/README.md#{name}" in alarm["alarm_description"], name


def _queries(alarm: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    expressions = [q for q in alarm["metric_query"] if q.get("return_data")]
    assert len(expressions) == 1
    metrics = {q["id"]: q["metric"][0] for q in alarm["metric_query"] if "metric" in q}
    return expressions[0]["expression"], metrics


def test_cpu_and_memory_alarms_watch_the_worker_service(alarms: dict[str, dict[str, Any]]) -> None:
    for name, metric in (("cpu_high", "CPUUtilization"), ("memory_high", "MemoryUtilization")):
        alarm = alarms[name]
        assert (alarm["namespace"], alarm["metric_name"]) == ("AWS/ECS", metric)
        assert alarm["dimensions"]["ServiceName"] == "${aws_ecs_service.worker.name}"


def test_billing_pending_alarm_reads_the_backlog_gauge(
    tf: dict[str, list[Any]], alarms: dict[str, dict[str, Any]]
) -> None:
    alarm = alarms["billing_pending_high"]
    expression, metrics = _queries(alarm)
    assert [m["metric_name"] for m in metrics.values()] == ["billing_pending"]
    metric = next(iter(metrics.values()))
    assert resolve_local(tf, metric["namespace"]) == "BillingWorker"
    # The agent sidecar publishes that exact metric into that namespace.
    config = tf_locals(tf)["cloudwatch_agent_config"]
    emf = config["logs"]["metrics_collected"]["prometheus"]["emf_processor"]
    assert resolve_local(tf, emf["metric_namespace"]) == "BillingWorker"
    assert any("^billing_pending$" in d["metric_selectors"] for d in emf["metric_declaration"])
    # Per-partition average times the partition count: 8 partitions averaging 200 -> 1600.
    partitions = number(tf, "${var.partitions}")
    total = metric_math(expression.replace("${var.partitions}", str(partitions)), {"per_partition": 200})
    assert total == 200 * partitions
    threshold = number(tf, alarm["threshold"])
    assert alarm_fires(alarm["comparison_operator"], total, threshold, alarm["treat_missing_data"])


@pytest.mark.parametrize(
    ("running", "fires"),
    [(0, True), (1, False), (2, True), (3, True), (None, True)],
)
def test_desired_count_drift_alarms_unless_exactly_one_beat(
    alarms: dict[str, dict[str, Any]], running: int | None, fires: bool
) -> None:
    alarm = alarms["desired_count_drift"]
    expression, metrics = _queries(alarm)
    assert metrics, "desired_count_drift has no metric"
    for metric in metrics.values():
        assert metric["metric_name"] == "RunningTaskCount"
        assert metric["namespace"] == "ECS/ContainerInsights"
        assert metric["dimensions"]["ServiceName"] == "${aws_ecs_service.beat.name}"
    value = metric_math(expression, dict.fromkeys(metrics, running))
    threshold = float(alarm["threshold"])
    assert alarm_fires(alarm["comparison_operator"], value, threshold, alarm["treat_missing_data"]) is fires


@pytest.mark.parametrize(
    ("failed", "succeeded", "fires"),
    [(0, 0, False), (0, 500, False), (1, 99, False), (10, 90, True), (3, 0, True), (None, None, False)],
)
def test_error_rate_alarms_on_task_failures(
    tf: dict[str, list[Any]],
    alarms: dict[str, dict[str, Any]],
    failed: int | None,
    succeeded: int | None,
    fires: bool,
) -> None:
    alarm = alarms["error_rate"]
    expression, metrics = _queries(alarm)
    filters = labelled(tf, "resource", "aws_cloudwatch_log_metric_filter")
    assert filters["task_failed"]["pattern"] == '"raised unexpected"'
    assert filters["task_succeeded"]["pattern"] == '"succeeded in"'
    names = {m["metric_name"]: query_id for query_id, m in metrics.items()}
    failed_id = names["${aws_cloudwatch_log_metric_filter.task_failed.metric_transformation[0].name}"]
    succeeded_id = names["${aws_cloudwatch_log_metric_filter.task_succeeded.metric_transformation[0].name}"]
    value = metric_math(expression, {failed_id: failed, succeeded_id: succeeded})
    threshold = number(tf, alarm["threshold"])
    assert alarm_fires(alarm["comparison_operator"], value, threshold, alarm["treat_missing_data"]) is fires


# --- ECS ---------------------------------------------------------------------------------------


def test_beat_service_runs_exactly_one_task_even_during_deploys(tf: dict[str, list[Any]]) -> None:
    beat = labelled(tf, "resource", "aws_ecs_service")["beat"]
    assert beat["desired_count"] == 1
    assert beat["deployment_maximum_percent"] == 100
    assert beat["deployment_minimum_healthy_percent"] == 0
    assert beat["task_definition"] == "${aws_ecs_task_definition.beat.arn}"
    containers = jsonencoded(
        labelled(tf, "resource", "aws_ecs_task_definition")["beat"]["container_definitions"]
    )
    command = resolve_local(tf, containers[0]["command"])
    assert command[:4] == ["celery", "-A", "worker.app", "beat"]


def test_cluster_has_container_insights(tf: dict[str, list[Any]]) -> None:
    cluster = labelled(tf, "resource", "aws_ecs_cluster")["this"]
    assert {"name": "containerInsights", "value": "enabled"} in cluster["setting"]


def _containers(tf: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for body in labelled(tf, "resource", "aws_ecs_task_definition").values():
        assert body["requires_compatibilities"] == ["FARGATE"]
        for container in jsonencoded(body["container_definitions"]):
            out[container["name"]] = container
    return out


SECRET_NAMES = {"BILLING_REDIS_URL", "BILLING_BROKER_URL", "BILLING_RESULT_BACKEND", "FLOWER_BASIC_AUTH"}


def test_urls_and_flower_credentials_come_from_secrets(tf: dict[str, list[Any]]) -> None:
    containers = _containers(tf)
    assert {"worker", "beat", "flower"} <= set(containers)
    for name in ("worker", "beat", "flower"):
        container = containers[name]
        environment = resolve_local(tf, container["environment"])
        env_names = {item["name"] for item in environment}
        assert not env_names & SECRET_NAMES, f"{name} has a secret in plain environment"
        assert {"BILLING_ENV", "BILLING_WAL_DIR", "BILLING_PARTITIONS"} <= env_names
        expected = "${local.flower_secrets}" if name == "flower" else "${local.billing_secrets}"
        assert container["secrets"] == expected, name
    billing_secrets = re.sub(r"\s+", " ", tf_locals(tf)["billing_secrets"])
    assert billing_secrets.startswith("${[for env_name , arn in local.secret_arns :")
    assert '"valueFrom": "${arn}"' in billing_secrets
    secret_arns = tf_locals(tf)["secret_arns"]
    assert set(secret_arns) == {"BILLING_REDIS_URL", "BILLING_BROKER_URL", "BILLING_RESULT_BACKEND"}
    assert all(re.fullmatch(r"\$\{var\.\w+_secret_arn\}", v) for v in secret_arns.values())
    flower_secrets = resolve_local(tf, containers["flower"]["secrets"])
    assert '"FLOWER_BASIC_AUTH"' in flower_secrets and "var.flower_basic_auth_secret_arn" in flower_secrets


def test_flower_refuses_to_start_without_basic_auth(tf: dict[str, list[Any]]) -> None:
    command = resolve_local(tf, _containers(tf)["flower"]["command"])
    script = command[-1]
    assert '[ -n "$FLOWER_BASIC_AUTH" ] ||' in script
    assert '--basic-auth="$FLOWER_BASIC_AUTH"' in script
    assert "celery -A worker.app flower" in script


def test_worker_container_mounts_the_shared_wal_and_runs_the_queues(tf: dict[str, list[Any]]) -> None:
    worker = _containers(tf)["worker"]
    command = resolve_local(tf, worker["command"])
    assert command[:6] == ["celery", "-A", "worker.app", "worker", "-Q", "billing,onboarding"]
    mounts = [resolve_local(tf, m) for m in worker["mountPoints"]]
    wal = [m for m in mounts if m["sourceVolume"] == "wal"]
    assert len(wal) == 1 and resolve_local(tf, wal[0]["containerPath"]) == "/var/lib/billing/wal"
    assert wal[0]["readOnly"] is False
    assert worker["user"] == "${local.uid}:${local.uid}" and tf_locals(tf)["uid"] != 0
    task = labelled(tf, "resource", "aws_ecs_task_definition")["worker"]
    efs = {v["name"]: v for v in task["volume"]}["wal"]["efs_volume_configuration"][0]
    assert efs["transit_encryption"] == "ENABLED"
    assert labelled(tf, "resource", "aws_efs_file_system")["wal"]["encrypted"] is True
