variable "aws_region" {
  description = "AWS region of the cluster, e.g. us-east-1."
  type        = string
}

variable "name" {
  description = "Prefix of every resource name."
  type        = string
  default     = "billing-worker"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "name must be 2-31 characters of [a-z0-9-], starting with a letter."
  }
}

variable "environment" {
  description = "BILLING_ENV: namespaces every Redis key and the WAL directory."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9_-]{1,32}$", var.environment))
    error_message = "environment must be 1-32 characters of [A-Za-z0-9_-] (same rule as BILLING_ENV)."
  }
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}

variable "image" {
  description = "billing-worker image (built from deploy/Dockerfile), preferably pinned by digest."
  type        = string
}

variable "cpu_architecture" {
  description = "X86_64 or ARM64; must match the image."
  type        = string
  default     = "X86_64"

  validation {
    condition     = contains(["X86_64", "ARM64"], var.cpu_architecture)
    error_message = "cpu_architecture must be X86_64 or ARM64."
  }
}

# --- network -----------------------------------------------------------------------------------

variable "vpc_id" {
  description = "VPC of the tasks, the EFS mount targets and the security groups."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets (one per AZ) for the tasks and the EFS mount targets."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "At least one subnet is required."
  }
}

variable "flower_ingress_cidr_blocks" {
  description = "CIDR blocks allowed to reach Flower on 5555 (its API also requires basic auth)."
  type        = list(string)
  default     = []
}

variable "metrics_ingress_cidr_blocks" {
  description = "CIDR blocks of Prometheus servers allowed to scrape the workers on 9808."
  type        = list(string)
  default     = []
}

# --- KMS and secrets ---------------------------------------------------------------------------

variable "kms_key_arn" {
  description = <<-EOT
    The one customer-managed KMS key the tasks may decrypt with (secrets, SNS). A key ARN
    arn:aws:kms:<region>:<account>:key/<uuid>: never a wildcard, never an alias (an alias can be
    re-pointed to another key without touching this policy).
  EOT
  type        = string

  validation {
    condition     = can(regex("^arn:aws:kms:[a-z]{2}(-[a-z]+){1,2}-[0-9]{1,2}:[0-9]{12}:key/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN arn:aws:kms:<region>:<12-digit account>:key/<uuid>; wildcards and alias ARNs are refused."
  }
}

variable "redis_url_secret_arn" {
  description = "Secrets Manager secret or SSM SecureString parameter holding BILLING_REDIS_URL (state Redis)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws:(secretsmanager|ssm):[a-z0-9-]+:[0-9]{12}:(secret:|parameter/)[A-Za-z0-9/_+=.@-]+$", var.redis_url_secret_arn))
    error_message = "redis_url_secret_arn must be a Secrets Manager secret ARN or an SSM parameter ARN."
  }
}

variable "broker_url_secret_arn" {
  description = "Secrets Manager secret or SSM SecureString parameter holding BILLING_BROKER_URL."
  type        = string

  validation {
    condition     = can(regex("^arn:aws:(secretsmanager|ssm):[a-z0-9-]+:[0-9]{12}:(secret:|parameter/)[A-Za-z0-9/_+=.@-]+$", var.broker_url_secret_arn))
    error_message = "broker_url_secret_arn must be a Secrets Manager secret ARN or an SSM parameter ARN."
  }
}

variable "result_backend_secret_arn" {
  description = "Secrets Manager secret or SSM SecureString parameter holding BILLING_RESULT_BACKEND."
  type        = string

  validation {
    condition     = can(regex("^arn:aws:(secretsmanager|ssm):[a-z0-9-]+:[0-9]{12}:(secret:|parameter/)[A-Za-z0-9/_+=.@-]+$", var.result_backend_secret_arn))
    error_message = "result_backend_secret_arn must be a Secrets Manager secret ARN or an SSM parameter ARN."
  }
}

variable "flower_basic_auth_secret_arn" {
  description = "Secrets Manager secret or SSM SecureString parameter holding Flower's user:password."
  type        = string

  validation {
    condition     = can(regex("^arn:aws:(secretsmanager|ssm):[a-z0-9-]+:[0-9]{12}:(secret:|parameter/)[A-Za-z0-9/_+=.@-]+$", var.flower_basic_auth_secret_arn))
    error_message = "flower_basic_auth_secret_arn must be a Secrets Manager secret ARN or an SSM parameter ARN."
  }
}

# --- worker settings (BILLING_*) ---------------------------------------------------------------

variable "partitions" {
  description = "BILLING_PARTITIONS. Fixed once the environment has been used."
  type        = number
  default     = 8

  validation {
    condition     = var.partitions >= 1 && var.partitions <= 1024 && floor(var.partitions) == var.partitions
    error_message = "partitions must be an integer in [1, 1024]."
  }
}

variable "metrics_port" {
  description = "BILLING_METRICS_PORT of the worker's Prometheus endpoint."
  type        = number
  default     = 9808
}

variable "worker_count" {
  description = "Worker tasks. They all share the WAL file system (EFS)."
  type        = number
  default     = 2
}

variable "worker_cpu" {
  type    = number
  default = 1024
}

variable "worker_memory" {
  type    = number
  default = 2048
}

variable "worker_concurrency" {
  description = "Celery prefork processes per worker task."
  type        = number
  default     = 2
}

variable "cloudwatch_agent_image" {
  description = "CloudWatch agent sidecar that publishes billing_pending (namespace BillingWorker). Pin it by digest in production."
  type        = string
  default     = "public.ecr.aws/cloudwatch-agent/cloudwatch-agent:latest"
}

variable "log_retention_days" {
  type    = number
  default = 30
}

# --- alarms ------------------------------------------------------------------------------------

variable "alarm_email" {
  description = "E-mail subscribed to the alarm topic; empty for none."
  type        = string
  default     = ""

  validation {
    condition     = var.alarm_email == "" || can(regex("^[^@[:space:]]+@[^@[:space:]]+\\.[^@[:space:]]+$", var.alarm_email))
    error_message = "alarm_email must be empty or an e-mail address."
  }
}

variable "cpu_high_threshold" {
  description = "cpu_high: worker service CPUUtilization, percent."
  type        = number
  default     = 80
}

variable "memory_high_threshold" {
  description = "memory_high: worker service MemoryUtilization, percent."
  type        = number
  default     = 85
}

variable "error_rate_threshold" {
  description = "error_rate: percent of finished Celery tasks that failed in 5 minutes."
  type        = number
  default     = 5
}

variable "pending_high_threshold" {
  description = "billing_pending_high: WAL entries without an outcome, summed over partitions."
  type        = number
  default     = 1000
}
