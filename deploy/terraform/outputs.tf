output "cluster_name" {
  value = aws_ecs_cluster.this.name
}

output "service_names" {
  value = {
    worker = aws_ecs_service.worker.name
    beat   = aws_ecs_service.beat.name
    flower = aws_ecs_service.flower.name
  }
}

output "worker_task_definition_arn" {
  description = "Also used for one-off CLI tasks (billing-worker ...) with a command override."
  value       = aws_ecs_task_definition.worker.arn
}

output "alarm_topic_arn" {
  value = aws_sns_topic.alarms.arn
}

output "alarm_names" {
  value = [
    aws_cloudwatch_metric_alarm.cpu_high.alarm_name,
    aws_cloudwatch_metric_alarm.memory_high.alarm_name,
    aws_cloudwatch_metric_alarm.error_rate.alarm_name,
    aws_cloudwatch_metric_alarm.billing_pending_high.alarm_name,
    aws_cloudwatch_metric_alarm.desired_count_drift.alarm_name,
  ]
}

output "task_role_arn" {
  value = aws_iam_role.task.arn
}

output "wal_file_system_id" {
  value = aws_efs_file_system.wal.id
}

output "task_security_group_id" {
  value = aws_security_group.tasks.id
}
