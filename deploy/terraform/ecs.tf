locals {
  metrics_namespace     = "BillingWorker"
  log_metrics_namespace = "BillingWorker/${var.environment}"

  log_options = {
    worker = {
      "awslogs-group"         = aws_cloudwatch_log_group.worker.name
      "awslogs-region"        = var.aws_region
      "awslogs-stream-prefix" = "worker"
    }
    beat = {
      "awslogs-group"         = aws_cloudwatch_log_group.beat.name
      "awslogs-region"        = var.aws_region
      "awslogs-stream-prefix" = "beat"
    }
    flower = {
      "awslogs-group"         = aws_cloudwatch_log_group.flower.name
      "awslogs-region"        = var.aws_region
      "awslogs-stream-prefix" = "flower"
    }
    cloudwatch_agent = {
      "awslogs-group"         = aws_cloudwatch_log_group.worker.name
      "awslogs-region"        = var.aws_region
      "awslogs-stream-prefix" = "cloudwatch-agent"
    }
  }

  # The CloudWatch agent scrapes the worker's :9808 in the same task and publishes the backlog
  # gauge as the custom metric BillingWorker/billing_pending{Environment} (embedded metric format).
  cloudwatch_agent_prometheus = {
    global = {
      scrape_interval = "60s"
      scrape_timeout  = "10s"
    }
    scrape_configs = [{
      job_name = "billing-worker"
      static_configs = [{
        targets = ["localhost:${var.metrics_port}"]
        labels  = { Environment = var.environment }
      }]
    }]
  }
  cloudwatch_agent_config = {
    logs = {
      force_flush_interval = 5
      metrics_collected = {
        prometheus = {
          prometheus_config_path = "env:PROMETHEUS_CONFIG_CONTENT"
          log_group_name         = aws_cloudwatch_log_group.metrics.name
          emf_processor = {
            metric_namespace = local.metrics_namespace
            metric_declaration = [
              {
                source_labels    = ["job"]
                label_matcher    = "^billing-worker$"
                dimensions       = [["Environment"]]
                metric_selectors = ["^billing_pending$", "^billing_breaker_open$"]
              },
              {
                source_labels    = ["job"]
                label_matcher    = "^billing-worker$"
                dimensions       = [["Environment", "result"]]
                metric_selectors = ["^billing_fence_results_total$"]
              },
            ]
          }
        }
      }
    }
  }

  worker_command = [
    "celery", "-A", "worker.app", "worker",
    "-Q", "billing,onboarding",
    "--loglevel=INFO", "-E",
    "--concurrency=${var.worker_concurrency}",
  ]
  beat_command = [
    "celery", "-A", "worker.app", "beat",
    "--loglevel=INFO", "--schedule=/tmp/celerybeat-schedule",
  ]
  # Refuses to start without credentials: Flower's API must never be open.
  flower_command = [
    "sh", "-c",
    "[ -n \"$FLOWER_BASIC_AUTH\" ] || { echo 'FLOWER_BASIC_AUTH is not set' >&2; exit 78; }; exec celery -A worker.app flower --port=5555 --basic-auth=\"$FLOWER_BASIC_AUTH\"",
  ]

  tmp_mount = { sourceVolume = "tmp", containerPath = local.tmp_path, readOnly = false }
  wal_mount = { sourceVolume = "wal", containerPath = local.wal_path, readOnly = false }

  # Flower's user:password arrives as a secret like the Redis URLs, never as plain environment.
  flower_secrets = concat(local.billing_secrets, [
    { name = "FLOWER_BASIC_AUTH", valueFrom = var.flower_basic_auth_secret_arn },
  ])

  cloudwatch_agent_environment = [
    { name = "CW_CONFIG_CONTENT", value = jsonencode(local.cloudwatch_agent_config) },
    { name = "PROMETHEUS_CONFIG_CONTENT", value = yamlencode(local.cloudwatch_agent_prometheus) },
  ]

  worker_health_check = {
    command     = ["CMD-SHELL", "celery -A worker.app inspect ping --destination celery@$(cat /proc/sys/kernel/hostname) --timeout 10 >/dev/null || exit 1"]
    interval    = 30
    timeout     = 20
    retries     = 3
    startPeriod = 60
  }
  flower_health_check = {
    command     = ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5555/healthcheck', timeout=5)"]
    interval    = 30
    timeout     = 10
    retries     = 3
    startPeriod = 30
  }
}

# --- task definitions --------------------------------------------------------------------------

resource "aws_ecs_task_definition" "worker" {
  family                   = "${local.name}-worker"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.worker_cpu
  memory                   = var.worker_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  volume {
    name = "wal"

    efs_volume_configuration {
      file_system_id     = aws_efs_file_system.wal.id
      transit_encryption = "ENABLED"

      authorization_config {
        access_point_id = aws_efs_access_point.wal.id
        iam             = "ENABLED"
      }
    }
  }

  # Task-local scratch (Prometheus multiprocess files); the root file system is read-only.
  volume {
    name = "tmp"
  }

  container_definitions = jsonencode([
    {
      name                   = "worker"
      image                  = var.image
      essential              = true
      user                   = "${local.uid}:${local.uid}"
      command                = local.worker_command
      environment            = local.billing_environment
      secrets                = local.billing_secrets
      readonlyRootFilesystem = true
      stopTimeout            = 120
      portMappings           = [{ containerPort = var.metrics_port, protocol = "tcp" }]
      mountPoints            = [local.wal_mount, local.tmp_mount]
      healthCheck            = local.worker_health_check
      logConfiguration = { logDriver = "awslogs", options = local.log_options.worker }
    },
    {
      name      = "cloudwatch-agent"
      image     = var.cloudwatch_agent_image
      essential = false
      environment      = local.cloudwatch_agent_environment
      logConfiguration = { logDriver = "awslogs", options = local.log_options.cloudwatch_agent }
    },
  ])
}

resource "aws_ecs_task_definition" "beat" {
  family                   = "${local.name}-beat"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 256
  memory                   = 512
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  volume {
    name = "tmp"
  }

  container_definitions = jsonencode([
    {
      name                   = "beat"
      image                  = var.image
      essential              = true
      user                   = "${local.uid}:${local.uid}"
      command                = local.beat_command
      environment            = local.billing_environment
      secrets                = local.billing_secrets
      readonlyRootFilesystem = true
      mountPoints            = [local.tmp_mount]
      logConfiguration       = { logDriver = "awslogs", options = local.log_options.beat }
    },
  ])
}

resource "aws_ecs_task_definition" "flower" {
  family                   = "${local.name}-flower"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 256
  memory                   = 512
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  volume {
    name = "tmp"
  }

  container_definitions = jsonencode([
    {
      name                   = "flower"
      image                  = var.image
      essential              = true
      user                   = "${local.uid}:${local.uid}"
      command                = local.flower_command
      environment            = local.billing_environment
      secrets                = local.flower_secrets
      readonlyRootFilesystem = true
      portMappings           = [{ containerPort = 5555, protocol = "tcp" }]
      mountPoints            = [local.tmp_mount]
      healthCheck            = local.flower_health_check
      logConfiguration = { logDriver = "awslogs", options = local.log_options.flower }
    },
  ])
}

# --- services ----------------------------------------------------------------------------------

resource "aws_ecs_service" "worker" {
  name                               = "worker"
  cluster                            = aws_ecs_cluster.this.id
  task_definition                    = aws_ecs_task_definition.worker.arn
  desired_count                      = var.worker_count
  launch_type                        = "FARGATE"
  platform_version                   = "LATEST"
  propagate_tags                     = "SERVICE"
  deployment_minimum_healthy_percent = 50
  deployment_maximum_percent         = 200

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = false
  }

  depends_on = [aws_efs_mount_target.wal, aws_iam_role_policy.task]
}

# Exactly one scheduler, also during deployments: the old task stops before the new one starts
# (minimum 0 %, maximum 100 %), so two beats never overlap. desired_count_drift watches it.
resource "aws_ecs_service" "beat" {
  name                               = "beat"
  cluster                            = aws_ecs_cluster.this.id
  task_definition                    = aws_ecs_task_definition.beat.arn
  desired_count                      = 1
  launch_type                        = "FARGATE"
  platform_version                   = "LATEST"
  propagate_tags                     = "SERVICE"
  deployment_minimum_healthy_percent = 0
  deployment_maximum_percent         = 100

  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = false
  }
}

resource "aws_ecs_service" "flower" {
  name                               = "flower"
  cluster                            = aws_ecs_cluster.this.id
  task_definition                    = aws_ecs_task_definition.flower.arn
  desired_count                      = 1
  launch_type                        = "FARGATE"
  platform_version                   = "LATEST"
  propagate_tags                     = "SERVICE"
  deployment_minimum_healthy_percent = 0
  deployment_maximum_percent         = 100

  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = false
  }
}
