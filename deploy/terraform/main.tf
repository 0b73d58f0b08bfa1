locals {
  name       = "${var.name}-${var.environment}"
  wal_path   = "/var/lib/billing/wal"
  tmp_path   = "/tmp"
  uid        = 10001
  account_id = data.aws_caller_identity.current.account_id

  secret_arns = {
    BILLING_REDIS_URL      = var.redis_url_secret_arn
    BILLING_BROKER_URL     = var.broker_url_secret_arn
    BILLING_RESULT_BACKEND = var.result_backend_secret_arn
  }
  secretsmanager_arns = [
    for arn in concat(values(local.secret_arns), [var.flower_basic_auth_secret_arn]) : arn
    if startswith(arn, "arn:aws:secretsmanager:")
  ]
  ssm_parameter_arns = [
    for arn in concat(values(local.secret_arns), [var.flower_basic_auth_secret_arn]) : arn
    if startswith(arn, "arn:aws:ssm:")
  ]

  # Plain settings; URLs (which carry passwords) only arrive through `secrets`.
  billing_environment = [
    { name = "BILLING_ENV", value = var.environment },
    { name = "BILLING_WAL_DIR", value = local.wal_path },
    { name = "BILLING_PARTITIONS", value = tostring(var.partitions) },
    { name = "BILLING_METRICS_PORT", value = tostring(var.metrics_port) },
    { name = "PROMETHEUS_MULTIPROC_DIR", value = "${local.tmp_path}/billing-prometheus" },
  ]
  billing_secrets = [for env_name, arn in local.secret_arns : { name = env_name, valueFrom = arn }]
}

data "aws_caller_identity" "current" {}

# --- cluster and logs --------------------------------------------------------------------------

resource "aws_ecs_cluster" "this" {
  name = local.name

  # Container Insights publishes RunningTaskCount (desired_count_drift).
  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_cloudwatch_log_group" "worker" {
  name              = "/ecs/${local.name}/worker"
  retention_in_days = var.log_retention_days
}

resource "aws_cloudwatch_log_group" "beat" {
  name              = "/ecs/${local.name}/beat"
  retention_in_days = var.log_retention_days
}

resource "aws_cloudwatch_log_group" "flower" {
  name              = "/ecs/${local.name}/flower"
  retention_in_days = var.log_retention_days
}

# Embedded-metric-format output of the CloudWatch agent sidecar (custom namespace BillingWorker).
resource "aws_cloudwatch_log_group" "metrics" {
  name              = "/ecs/${local.name}/prometheus-metrics"
  retention_in_days = 7
}

# --- IAM ---------------------------------------------------------------------------------------

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    sid     = "EcsTasksAssume"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

# Execution role: pulls the image, writes logs, injects `secrets` into the containers.
resource "aws_iam_role" "execution" {
  name               = "${local.name}-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy_attachment" "execution_managed" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "execution_secrets" {
  dynamic "statement" {
    for_each = length(local.secretsmanager_arns) > 0 ? [1] : []
    content {
      sid       = "ReadBillingSecrets"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = local.secretsmanager_arns
    }
  }

  dynamic "statement" {
    for_each = length(local.ssm_parameter_arns) > 0 ? [1] : []
    content {
      sid       = "ReadBillingParameters"
      actions   = ["ssm:GetParameters"]
      resources = local.ssm_parameter_arns
    }
  }

  # The secrets are encrypted with the one billing key; decrypt only through those services.
  statement {
    sid       = "DecryptBillingSecrets"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values = [
        "secretsmanager.${var.aws_region}.amazonaws.com",
        "ssm.${var.aws_region}.amazonaws.com",
      ]
    }
  }
}

resource "aws_iam_role_policy" "execution_secrets" {
  name   = "billing-secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution_secrets.json
}

# Task role: what the billing code itself may do.
resource "aws_iam_role" "task" {
  name               = "${local.name}-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "task" {
  # KMS: decrypt with exactly one key, named by its key ARN (validated: no wildcard, no alias).
  statement {
    sid       = "DecryptWithBillingKey"
    effect    = "Allow"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
  }

  # The shared WAL file system, through its access point only.
  statement {
    sid       = "MountWal"
    actions   = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"]
    resources = [aws_efs_file_system.wal.arn]

    condition {
      test     = "StringEquals"
      variable = "elasticfilesystem:AccessPointArn"
      values   = [aws_efs_access_point.wal.arn]
    }
  }

  # CloudWatch agent sidecar: embedded-metric-format logs into its own log group.
  statement {
    sid = "PublishPrometheusMetrics"
    actions = [
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogStreams",
    ]
    resources = [
      aws_cloudwatch_log_group.metrics.arn,
      "${aws_cloudwatch_log_group.metrics.arn}:log-stream:*",
    ]
  }
}

resource "aws_iam_role_policy" "task" {
  name   = "billing-task"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.task.json
}

# --- network -----------------------------------------------------------------------------------

resource "aws_security_group" "tasks" {
  name        = "${local.name}-tasks"
  description = "billing-worker ECS tasks"
  vpc_id      = var.vpc_id

  egress {
    description = "Redis, ECR, CloudWatch, Secrets Manager"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_vpc_security_group_ingress_rule" "metrics" {
  for_each          = toset(var.metrics_ingress_cidr_blocks)
  security_group_id = aws_security_group.tasks.id
  description       = "Prometheus scrape of the worker"
  ip_protocol       = "tcp"
  from_port         = var.metrics_port
  to_port           = var.metrics_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "flower" {
  for_each          = toset(var.flower_ingress_cidr_blocks)
  security_group_id = aws_security_group.tasks.id
  description       = "Flower UI/API (basic auth)"
  ip_protocol       = "tcp"
  from_port         = 5555
  to_port           = 5555
  cidr_ipv4         = each.value
}

resource "aws_security_group" "efs" {
  name        = "${local.name}-wal-efs"
  description = "NFS from the billing-worker tasks only"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "efs_nfs" {
  security_group_id            = aws_security_group.efs.id
  description                  = "NFS from the tasks"
  ip_protocol                  = "tcp"
  from_port                    = 2049
  to_port                      = 2049
  referenced_security_group_id = aws_security_group.tasks.id
}

# --- WAL: one shared, encrypted EFS file system ----------------------------------------------------
# Every worker task may take any partition's lease, so every task must see every partition
# directory and share its fcntl locks: EFS (NFSv4.1 byte-range locks, fsync durable across AZs).

resource "aws_efs_file_system" "wal" {
  creation_token   = "${local.name}-wal"
  encrypted        = true
  kms_key_id       = var.kms_key_arn
  performance_mode = "generalPurpose"
  throughput_mode  = "elastic"

  tags = {
    Name = "${local.name}-wal"
  }

  lifecycle {
    # The WAL is the authoritative record of every billing entry.
    prevent_destroy = true
  }
}

resource "aws_efs_backup_policy" "wal" {
  file_system_id = aws_efs_file_system.wal.id

  backup_policy {
    status = "ENABLED"
  }
}

resource "aws_efs_mount_target" "wal" {
  for_each        = toset(var.subnet_ids)
  file_system_id  = aws_efs_file_system.wal.id
  subnet_id       = each.value
  security_groups = [aws_security_group.efs.id]
}

resource "aws_efs_access_point" "wal" {
  file_system_id = aws_efs_file_system.wal.id

  posix_user {
    uid = local.uid
    gid = local.uid
  }

  root_directory {
    path = "/billing-wal"

    creation_info {
      owner_uid   = local.uid
      owner_gid   = local.uid
      permissions = "0750"
    }
  }
}
