# --- alarm topic (KMS-encrypted) -------------------------------------------------------------------
# The key policy of var.kms_key_arn must let cloudwatch.amazonaws.com use the key
# (kms:GenerateDataKey*, kms:Decrypt), or alarm notifications are dropped. See deploy/README.md.

resource "aws_sns_topic" "alarms" {
  name              = "${local.name}-alarms"
  kms_master_key_id = var.kms_key_arn
}

data "aws_iam_policy_document" "alarm_topic" {
  statement {
    sid       = "CloudWatchAlarmsPublish"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms.arn]

    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_sns_topic_policy" "alarms" {
  arn    = aws_sns_topic.alarms.arn
  policy = data.aws_iam_policy_document.alarm_topic.json
}

resource "aws_sns_topic_subscription" "alarm_email" {
  count     = var.alarm_email == "" ? 0 : 1
  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = var.alarm_email
}

# --- task outcomes from the worker log (Celery's own log lines) ----------------------------------

resource "aws_cloudwatch_log_metric_filter" "task_failed" {
  name           = "${local.name}-task-failed"
  log_group_name = aws_cloudwatch_log_group.worker.name
  # celery.app.trace: "Task <name>[<id>] raised unexpected: <exc>"
  pattern = "\"raised unexpected\""

  metric_transformation {
    name          = "celery_task_failed"
    namespace     = local.log_metrics_namespace
    value         = "1"
    default_value = "0"
  }
}

resource "aws_cloudwatch_log_metric_filter" "task_succeeded" {
  name           = "${local.name}-task-succeeded"
  log_group_name = aws_cloudwatch_log_group.worker.name
  # celery.app.trace: "Task <name>[<id>] succeeded in <s>s: <result>"
  pattern = "\"succeeded in\""

  metric_transformation {
    name          = "celery_task_succeeded"
    namespace     = local.log_metrics_namespace
    value         = "1"
    default_value = "0"
  }
}

# --- the five alarms -------------------------------------------------------------------------------

resource "aws_cloudwatch_metric_alarm" "cpu_high" {
  alarm_name          = "${local.name}-cpu_high"
  alarm_description   = "Worker service CPU above ${var.cpu_high_threshold}% for 5 minutes. Runbook: deploy/README.md#cpu_high"
  namespace           = "AWS/ECS"
  metric_name         = "CPUUtilization"
  statistic           = "Average"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 5
  threshold           = var.cpu_high_threshold
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"

  dimensions = {
    ClusterName = aws_ecs_cluster.this.name
    ServiceName = aws_ecs_service.worker.name
  }

  alarm_actions = [aws_sns_topic.alarms.arn]
  ok_actions    = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "memory_high" {
  alarm_name          = "${local.name}-memory_high"
  alarm_description   = "Worker service memory above ${var.memory_high_threshold}% for 5 minutes. Runbook: deploy/README.md#memory_high"
  namespace           = "AWS/ECS"
  metric_name         = "MemoryUtilization"
  statistic           = "Average"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 5
  threshold           = var.memory_high_threshold
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"

  dimensions = {
    ClusterName = aws_ecs_cluster.this.name
    ServiceName = aws_ecs_service.worker.name
  }

  alarm_actions = [aws_sns_topic.alarms.arn]
  ok_actions    = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "error_rate" {
  alarm_name          = "${local.name}-error_rate"
  alarm_description   = "More than ${var.error_rate_threshold}% of finished Celery tasks failed (raised) in 5 minutes. Runbook: deploy/README.md#error_rate"
  evaluation_periods  = 1
  threshold           = var.error_rate_threshold
  comparison_operator = "GreaterThanThreshold"
  # No log lines at all means no tasks ran: nothing failed.
  treat_missing_data = "notBreaching"

  metric_query {
    id          = "failed_pct"
    label       = "failed tasks, percent"
    expression  = "IF(FILL(failed, 0) + FILL(succeeded, 0) > 0, 100 * FILL(failed, 0) / (FILL(failed, 0) + FILL(succeeded, 0)), 0)"
    return_data = true
  }

  metric_query {
    id = "failed"

    metric {
      namespace   = local.log_metrics_namespace
      metric_name = aws_cloudwatch_log_metric_filter.task_failed.metric_transformation[0].name
      period      = 300
      stat        = "Sum"
    }
  }

  metric_query {
    id = "succeeded"

    metric {
      namespace   = local.log_metrics_namespace
      metric_name = aws_cloudwatch_log_metric_filter.task_succeeded.metric_transformation[0].name
      period      = 300
      stat        = "Sum"
    }
  }

  alarm_actions = [aws_sns_topic.alarms.arn]
  ok_actions    = [aws_sns_topic.alarms.arn]
}

# billing_pending{partition} is scraped by the CloudWatch agent sidecar of every worker task (each
# sees the whole shared WAL). Every scrape yields one datapoint per partition, so the period's
# Average is the mean backlog of one partition; times the partition count it is the total.
resource "aws_cloudwatch_metric_alarm" "billing_pending_high" {
  alarm_name          = "${local.name}-billing_pending_high"
  alarm_description   = "More than ${var.pending_high_threshold} billing entries pending in the WAL for 15 minutes. Runbook: deploy/README.md#billing_pending_high"
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  threshold           = var.pending_high_threshold
  comparison_operator = "GreaterThanThreshold"
  # No backlog gauge means nobody watches the authoritative record's backlog: treat as an alarm.
  treat_missing_data = "breaching"

  metric_query {
    id          = "pending_total"
    label       = "pending entries, all partitions"
    expression  = "per_partition * ${var.partitions}"
    return_data = true
  }

  metric_query {
    id = "per_partition"

    metric {
      namespace   = local.metrics_namespace
      metric_name = "billing_pending"
      period      = 300
      stat        = "Average"
      dimensions = {
        Environment = var.environment
      }
    }
  }

  alarm_actions = [aws_sns_topic.alarms.arn]
  ok_actions    = [aws_sns_topic.alarms.arn]
}

# Beat must run exactly once: alarm on 0 (nothing schedules replay/checkpoint/backlog) and on
# 2 or more (every scheduled task runs twice).
resource "aws_cloudwatch_metric_alarm" "desired_count_drift" {
  alarm_name          = "${local.name}-desired_count_drift"
  alarm_description   = "The beat service does not run exactly one task (0 or >= 2) for 3 minutes. Runbook: deploy/README.md#desired_count_drift"
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  threshold           = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  # Container Insights reports RunningTaskCount (also 0) for every service: silence is a fault.
  treat_missing_data = "breaching"

  metric_query {
    id          = "drift"
    label       = "beat task count is not 1"
    expression  = "IF(FILL(beat_min, 0) < 1 || FILL(beat_max, 0) > 1, 1, 0)"
    return_data = true
  }

  metric_query {
    id = "beat_min"

    metric {
      namespace   = "ECS/ContainerInsights"
      metric_name = "RunningTaskCount"
      period      = 60
      stat        = "Minimum"
      dimensions = {
        ClusterName = aws_ecs_cluster.this.name
        ServiceName = aws_ecs_service.beat.name
      }
    }
  }

  metric_query {
    id = "beat_max"

    metric {
      namespace   = "ECS/ContainerInsights"
      metric_name = "RunningTaskCount"
      period      = 60
      stat        = "Maximum"
      dimensions = {
        ClusterName = aws_ecs_cluster.this.name
        ServiceName = aws_ecs_service.beat.name
      }
    }
  }

  alarm_actions = [aws_sns_topic.alarms.arn]
  ok_actions    = [aws_sns_topic.alarms.arn]
}
