"""Billing tasks (DESIGN.md §3): thin adapters over :mod:`worker.pipeline`.

``billing.process_entry`` takes one message per call by default. With ``BILLING_BATCH_SIZE`` > 1
the same task name is served by a celery-batches task instead: the worker buffers up to that many
messages (or ``BILLING_BATCH_FLUSH_MS``) and hands them to :meth:`Pipeline.process_batch` at once
(one lease, one fsync, one pipelined credit trip per partition); each message still gets its own
result, and an entry that must wait is re-sent on its own with the same task id.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import Task
from celery.utils.log import get_task_logger
from celery_batches import SimpleRequest

from worker.app import app
from worker.backoff import retry_delay
from worker.batch_consumer import TASK_FAILED, TASK_RETRIED, TASK_SUCCEEDED, EagerBatches
from worker.errors import RetryLater, WalError
from worker.runtime import get_runtime
from worker.settings import get_settings

TASK_NAME = "billing.process_entry"

log = get_task_logger(__name__)


def _retry(task: Task[Any, Any], error: RetryLater) -> Exception:
    runtime = get_runtime()
    delay = retry_delay(error.kind, task.request.retries, runtime.settings.retry_max_s)
    return task.retry(countdown=delay, exc=error, max_retries=None)


def process_entry_one(self: Task[Any, Any], payload: Any) -> dict[str, Any]:
    """One settled payment → ``credited | no_credit | duplicate | deferred | cap_exceeded |
    rejected``. Never raises for a bad entry; STALE / busy / CORRUPT are retried (kept)."""
    try:
        return get_runtime().pipeline.process_entry(payload).to_result()
    except RetryLater as error:
        raise _retry(self, error) from None
    except (WalError, OSError) as error:  # the local log cannot take it now: keep the message
        raise _retry(self, RetryLater("error", str(error))) from None


def process_entry_batch(requests: list[SimpleRequest]) -> list[str]:
    """The batch form: every request's result is stored as the single form would return it.

    Returns each request's task event (``task-succeeded`` / ``task-retried`` / ``task-failed``),
    which :class:`~worker.batch_consumer.EagerBatches` sends from the consumer, as Celery does.
    """
    runtime = get_runtime()
    payloads = [request.args[0] if request.args else None for request in requests]
    events: list[str] = []
    try:
        try:
            results: list[Any] = runtime.pipeline.process_batch(payloads)
        except (WalError, OSError) as error:  # the local log cannot take them now: keep them
            results = [RetryLater("error", str(error))] * len(requests)
        for request, payload, result in zip(requests, payloads, results, strict=True):
            if isinstance(result, RetryLater):
                retries = int((request.request_dict or {}).get("retries") or 0)
                app.backend.mark_as_retry(request.id, result, request=request)  # as Task.retry does
                app.send_task(
                    TASK_NAME,
                    args=[payload],
                    task_id=request.id,
                    countdown=retry_delay(result.kind, retries, runtime.settings.retry_max_s),
                    retries=retries + 1,
                    queue="billing",
                )
                events.append(TASK_RETRIED)
            else:
                answer = result.to_result()
                app.backend.mark_as_done(request.id, answer, request=request)
                events.append(TASK_SUCCEEDED)
                if log.isEnabledFor(logging.INFO):  # the line Celery logs for a single task
                    log.info("Task %s[%s] succeeded in a batch of %d: %r", TASK_NAME, request.id, len(requests), answer)
    except Exception as error:  # a bug or the result backend gone: as a single task, FAILURE
        log.exception("batch of %d failed after %d results", len(requests), len(events))
        for request in requests[len(events) :]:
            with contextlib.suppress(Exception):
                app.backend.mark_as_failure(request.id, error, request=request)
        events += [TASK_FAILED] * (len(requests) - len(events))
    return events


def register_process_entry(batch_size: int, batch_flush_ms: int) -> Task[Any, Any]:
    """Register ``billing.process_entry`` in its single (``batch_size`` 1) or batch form,
    replacing any earlier registration; a worker builds its consumers from what is registered
    when it starts. Called once below from the settings (and by tests, to run both forms)."""
    app.tasks.pop(TASK_NAME, None)
    if batch_size > 1:
        task: Task[Any, Any] = app.task(
            name=TASK_NAME,
            base=EagerBatches,
            flush_every=batch_size,
            flush_interval=batch_flush_ms / 1000,
            acks_late=True,
        )(process_entry_batch)
    else:
        task = app.task(name=TASK_NAME, bind=True, max_retries=None)(process_entry_one)
    return task


process_entry = register_process_entry(get_settings().batch_size, get_settings().batch_flush_ms)


@app.task(name="billing.apply_credit", bind=True, max_retries=None)
def apply_credit(self: Task[Any, Any], payload: Any) -> dict[str, Any]:
    """Consume up to ``required_amount`` of a wallet's credit, idempotently per ``request_id``."""
    try:
        return get_runtime().pipeline.apply_credit(payload).to_result()
    except RetryLater as error:
        raise _retry(self, error) from None
    except (WalError, OSError) as error:
        raise _retry(self, RetryLater("error", str(error))) from None
