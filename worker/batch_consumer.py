"""The batch consumer: celery-batches' ``Batches`` task, flushing as soon as a pool process is free.

celery-batches flushes a buffer every ``flush_every`` messages or every ``flush_interval``
seconds, so at low load every message waits out the interval. :class:`EagerBatches` is group
commit instead: a message arriving while a pool process is idle is handed over at once (a batch of
one, the latency of the single path); messages arriving while every process is busy wait in the
buffer and leave together, up to ``flush_every`` per batch, the moment a process comes free. The
interval timer remains as a backstop (and to release ETA messages whose time has come).

Delivery guarantees, in the consumer process:

* every message of a batch is acknowledged only after the batch function returned (it stores
  each message's result first): late acknowledgement always, whatever the task's ``acks_late``;
* if the pool process running a batch dies (``WorkerLostError``) or the batch errors out of the
  pool, every message of that batch is **rejected with requeue**, i.e. redelivered at once, as
  ``task_reject_on_worker_lost`` does for single messages;
* each message gets its own ``task-succeeded`` / ``task-retried`` / ``task-failed`` event, as
  the batch function reports them, so Flower and the error-rate alarm see batched tasks too;
* a message whose ETA (a retry's countdown) is still in the future is held, unacknowledged, until
  it is due, and (as Celery does for ETA tasks) raises the prefetch window while held, so held
  retries never starve the other messages.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime
from time import monotonic, time
from typing import Any

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

log = logging.getLogger(__name__)

#: Task events a batch function reports per request (sent by the consumer, as Celery does).
TASK_SUCCEEDED = "task-succeeded"
TASK_RETRIED = "task-retried"
TASK_FAILED = "task-failed"


def _due(request: Any, now: float) -> bool:
    """Whether ``request`` may run now (no ETA, or an ETA in the past; a bad ETA runs now)."""
    eta = request.eta
    if eta is None:
        return True
    if isinstance(eta, datetime):
        try:
            return bool(eta.timestamp() <= now)
        except (OverflowError, ValueError, OSError):
            return True
    return True


class EagerBatches(Batches):  # type: ignore[misc]  # celery-batches ships no types
    """``Batches`` with group commit: flush when a pool process is free, at most ``flush_every``."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self._ready: deque[Any] = deque()  #: due requests waiting for a free pool process
        self._in_flight = 0  #: batches handed to the pool and not yet returned
        self._slots = 1  #: pool processes (the worker's concurrency)
        self._dispatching = False
        self._again = False
        self._consumer: Any = None  #: the worker's consumer (its prefetch QoS), set by Strategy
        self._held: set[int] = set()  #: id() of requests held for their ETA, counted in the QoS

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Callable[..., None]:
        handler: Callable[..., None] = super().Strategy(task, app, consumer)
        self._slots = max(1, int(getattr(consumer.pool, "limit", None) or 1))
        self._consumer = consumer

        def eager_handler(*args: Any, **kwargs: Any) -> None:
            handler(*args, **kwargs)  # buffers the request (and starts the backstop timer)
            if self._in_flight < self._slots:
                self._do_flush()

        return eager_handler

    def _do_flush(self) -> None:
        """Move buffered requests to the ready queue (or pending, if not due) and hand batches to
        free pool processes. Re-entrant calls (a solo pool runs callbacks inline) loop instead."""
        if self._dispatching:
            self._again = True
            return
        self._dispatching = True
        try:
            while True:
                self._again = False
                self._collect()
                while self._ready and self._in_flight < self._slots:
                    size = min(len(self._ready), self.flush_every)
                    self._flush_batch([self._ready.popleft() for _ in range(size)])
                if not self._again:
                    break
        finally:
            self._dispatching = False
        timer: Any = getattr(self, "_tref", None)
        if not self._ready and self._pending.qsize() == 0 and self._buffer.qsize() == 0 and timer is not None:
            timer.cancel()
            self._tref = None

    def _collect(self) -> None:
        now = time()
        waiting: list[Any] = []
        for queue in (self._buffer, self._pending):
            while True:
                try:
                    waiting.append(queue.get_nowait())
                except Exception:  # queue.Empty
                    break
        for request in waiting:
            if _due(request, now):
                self._release_hold(request)
                self._ready.append(request)
            else:
                self._hold(request)
                self._pending.put(request)

    def _hold(self, request: Any) -> None:
        """A request waiting for its ETA does not use up the prefetch window (as Celery does for
        ETA tasks): otherwise retries held for their countdown, e.g. every entry of a partition
        whose fence is CORRUPT, would stop the worker fetching anything else."""
        if id(request) not in self._held and self._consumer is not None:
            self._held.add(id(request))
            self._consumer.qos.increment_eventually()

    def _release_hold(self, request: Any) -> None:
        if id(request) in self._held:
            self._held.discard(id(request))
            self._consumer.qos.decrement_eventually()

    def _flush_batch(self, requests: list[Any]) -> None:
        """Hand one batch to the pool; settle its messages when it returns or dies."""
        self._in_flight += 1
        started = monotonic()
        settled = False

        def settle() -> bool:
            nonlocal settled
            if settled:
                return False
            settled = True
            self._in_flight = max(0, self._in_flight - 1)
            return True

        def on_return(events: Any) -> None:
            if settle():
                _send_events(requests, events, monotonic() - started)
                _acknowledge(requests)
                self._do_flush()

        def on_error(error: Any) -> None:
            if settle():
                log.error(
                    "batch of %d lost after %.3f s (%r): every message is requeued",
                    len(requests),
                    monotonic() - started,
                    getattr(error, "exception", error),
                )
                _requeue(requests)
                self._do_flush()

        simple = ([SimpleRequest.from_request(r) for r in requests],)
        try:
            self._pool.apply_async(
                apply_batches_task,
                (self, simple, 0, None),
                callback=on_return,
                error_callback=on_error,
            )
        except Exception:
            if settle():
                _requeue(requests)
            raise


def _send_events(requests: list[Any], events: Any, runtime_s: float) -> None:
    """One task event per request (Flower, the error-rate alarm). ``events`` is what the batch
    function returned: a list of event types, or ``None`` when it raised (all failed)."""
    if not isinstance(events, list) or len(events) != len(requests):
        events = [TASK_FAILED] * len(requests)
    for request, event in zip(requests, events, strict=True):
        if event == TASK_SUCCEEDED:
            request.send_event(event, result="batched", runtime=runtime_s)
        elif event == TASK_RETRIED:
            request.send_event(event, exception="RetryLater: re-sent with a countdown", traceback="")
        else:
            request.send_event(TASK_FAILED, exception="batch failed: see the worker log", traceback="")


def _acknowledge(requests: Iterable[Any]) -> None:
    for request in requests:
        if not request.acknowledged:
            request.acknowledge()


def _requeue(requests: Iterable[Any]) -> None:
    for request in requests:
        if not request.acknowledged:
            request.reject(requeue=True)
