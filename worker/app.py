"""The Celery app: ``celery -A worker.app worker|beat|flower``.

Reliability settings (DESIGN.md §7): late acks and reject-on-worker-lost (a killed child's task
is requeued), prefetch 1, JSON only, and a visibility timeout with a fast unacked-restore sweep so
a whole worker's death is noticed in about ``visibility_timeout`` seconds, not ~100 s later.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_process_shutdown
from kombu import Exchange, Queue

from worker import metrics
from worker.errors import ConfigError
from worker.settings import Settings, get_settings

#: Beat periods, seconds.
REPLAY_EVERY_S = 5.0
BACKLOG_EVERY_S = 15.0
CHECKPOINT_EVERY_S = 60.0


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration derived from the settings (also used by tests and the demo)."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        # one message per process, or a whole batch when the batch consumer is on
        "worker_prefetch_multiplier": settings.batch_size,
        "task_default_queue": "billing",
        # Each queue on its own exchange and key: a bare Queue("onboarding") would be bound to the
        # default exchange "billing" with key "billing", so a message published to that exchange
        # and key would be copied into onboarding too (Celery itself publishes via "" today).
        "task_queues": (
            Queue("billing", Exchange("billing", type="direct"), routing_key="billing"),
            Queue("onboarding", Exchange("onboarding", type="direct"), routing_key="onboarding"),
        ),
        "task_routes": {"billing.*": {"queue": "billing"}, "onboarding.*": {"queue": "onboarding"}},
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        "result_expires": timedelta(days=1),
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,  # Flower and the error_rate alarm need task events
        "task_send_sent_event": True,
        "beat_schedule": {
            "replay-pending": {"task": "billing.replay_pending", "schedule": REPLAY_EVERY_S},
            "report-backlog": {"task": "billing.report_backlog", "schedule": BACKLOG_EVERY_S},
            "checkpoint": {"task": "billing.checkpoint", "schedule": CHECKPOINT_EVERY_S},
        },
    }


def _load_settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as error:
        print(f"billing-worker: {error}", file=sys.stderr)
        raise SystemExit(2) from None


app = Celery("billing_worker", include=["tasks.billing", "tasks.maintenance", "tasks.onboarding"])
app.conf.update(celery_config(_load_settings()))


@worker_init.connect
def _check_and_serve(**_: Any) -> None:
    """In the worker's main process: refuse to start on a bad WAL (partition count), export the
    backlog of every partition (0 included) and serve metrics."""
    from worker.runtime import build_runtime

    runtime = build_runtime(get_settings())
    try:
        runtime.pipeline.report_backlog()
    finally:
        runtime.close()
    metrics.serve(get_settings().metrics_port)


@worker_process_init.connect
def _fresh_runtime_after_fork(**_: Any) -> None:
    from worker.runtime import reset_runtime

    reset_runtime(close=False)


@worker_process_shutdown.connect
def _mark_dead(**_: Any) -> None:
    metrics.mark_process_dead(os.getpid())
