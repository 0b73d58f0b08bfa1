"""Billing tasks (DESIGN.md §3): thin adapters over :mod:`worker.pipeline`."""

from __future__ import annotations

from typing import Any

from celery import Task

from worker.app import app
from worker.backoff import retry_delay
from worker.errors import RetryLater, WalError
from worker.runtime import get_runtime


def _retry(task: Task[Any, Any], error: RetryLater) -> Exception:
    runtime = get_runtime()
    delay = retry_delay(error.kind, task.request.retries, runtime.settings.retry_max_s)
    return task.retry(countdown=delay, exc=error, max_retries=None)


@app.task(name="billing.process_entry", bind=True, max_retries=None)
def process_entry(self: Task[Any, Any], payload: Any) -> dict[str, Any]:
    """One settled payment → ``credited | no_credit | duplicate | deferred | cap_exceeded |
    rejected``. Never raises for a bad entry; STALE / busy / CORRUPT are retried (kept)."""
    try:
        return get_runtime().pipeline.process_entry(payload).to_result()
    except RetryLater as error:
        raise _retry(self, error) from None
    except (WalError, OSError) as error:  # the local log cannot take it now: keep the message
        raise _retry(self, RetryLater("error", str(error))) from None


@app.task(name="billing.apply_credit", bind=True, max_retries=None)
def apply_credit(self: Task[Any, Any], payload: Any) -> dict[str, Any]:
    """Consume up to ``required_amount`` of a wallet's credit, idempotently per ``request_id``."""
    try:
        return get_runtime().pipeline.apply_credit(payload).to_result()
    except RetryLater as error:
        raise _retry(self, error) from None
    except (WalError, OSError) as error:
        raise _retry(self, RetryLater("error", str(error))) from None
