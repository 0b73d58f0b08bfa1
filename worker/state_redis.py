"""The state Redis (fencing and credit): one client per process, bounded retries, breaker.

Every script call goes through :meth:`StateRedis.run`, the single boundary where redis-py errors
become ours:

* connection refused / reset / timed out (after ``attempts`` tries, or at once while the
  circuit breaker is open) → :class:`~worker.errors.RedisUnavailable`;
* an error *reply* (a script refusing its arguments) → :class:`~worker.errors.ScriptError`.

Retrying is safe because every script is idempotent under retry: a lease retried after a lost
reply answers ``{0, <our own holder id>}``, a validate-and-advance answers ``STALE`` (the caller
retries with a new lease), a credit note answers ``DUPLICATE`` and a consumption its first answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random,
)

from worker.breaker import CircuitBreaker
from worker.errors import RedisUnavailable, ScriptError
from worker.redaction import redact_url
from worker.scripts import Scripts
from worker.settings import Settings

log = logging.getLogger(__name__)

#: redis-py errors that mean "no answer" (as opposed to an error reply).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)

#: Tries per call before the state Redis counts as unavailable (first try included).
DEFAULT_ATTEMPTS = 2
#: Upper bound of the random pause between tries, seconds.
RETRY_JITTER_S = 0.05


def connect(url: str, *, timeout_ms: int) -> redis.Redis:
    """A client whose connect and read timeouts are ``timeout_ms``, with redis-py's own retries
    off (ours are in :meth:`StateRedis.run`), so a paused Redis costs a bounded, known time."""
    timeout_s = timeout_ms / 1000
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


class StateRedis:
    """Scripts and plain reads on the state Redis, with errors translated at this boundary."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        breaker: CircuitBreaker | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        label: str = "state redis",
    ) -> None:
        self.client = client
        self.scripts = Scripts.register(client)
        self.breaker = breaker
        self._attempts = attempts
        self._label = label

    @classmethod
    def from_settings(cls, settings: Settings, *, breaker: CircuitBreaker | None = None) -> StateRedis:
        client = connect(settings.redis_url, timeout_ms=settings.redis_timeout_ms)
        return cls(client, breaker=breaker, label=redact_url(settings.redis_url))

    def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run ``script``; raise RedisUnavailable on no answer, ScriptError on an error reply."""
        return self.call(lambda: script(keys=list(keys), args=list(args)))

    def call(self, operation: Any) -> Any:
        """Run ``operation()`` (a redis-py call) under the breaker and the bounded retry."""
        self._admit()
        return self._tries(operation)

    def start_call(self, send: Callable[[], Callable[[], Any]], operation: Callable[[], Any]) -> Callable[[], Any]:
        """:meth:`call` in two halves, so the caller can work while Redis does.

        Now: the breaker check (RedisUnavailable at once while it is open) and ``send()``, the
        first try's send half, which returns the function reading that try's answer. Returned:
        ``finish``, which reads it; if either half met a connection error, the later tries run
        ``operation()`` (the whole call) within the same bounded tries. Breaker accounting and
        error translation are exactly :meth:`call`'s. Call ``finish`` exactly once, always: a
        half-open breaker waits for this probe's result.
        """
        self._admit()
        first: list[Callable[[], Any]] = []
        try:
            first.append(send())
        except TRANSIENT_ERRORS as error:
            failed = error

            def reraise() -> Any:
                raise failed

            first.append(reraise)

        def attempt() -> Any:
            return first.pop()() if first else operation()

        return lambda: self._tries(attempt)

    def _admit(self) -> None:
        if self.breaker is not None and not self.breaker.allow():
            raise RedisUnavailable(f"{self._label}: circuit breaker open")

    def _tries(self, operation: Callable[[], Any]) -> Any:
        retrying = Retrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_random(0, RETRY_JITTER_S),
            retry=retry_if_exception_type(TRANSIENT_ERRORS),
            reraise=False,
        )
        try:
            result = retrying(operation)
        except RetryError as error:
            if self.breaker is not None:
                self.breaker.record_failure()
            cause = error.last_attempt.exception()
            kind = type(cause).__name__ if cause is not None else "error"
            if isinstance(cause, redis.exceptions.AuthenticationError):
                # redis-py files a refused password under ConnectionError: we still fail open
                # (nothing is lost), but this is a configuration error, not an outage.
                log.critical("%s: authentication failed; check the credentials in BILLING_REDIS_URL", self._label)
            raise RedisUnavailable(f"{self._label}: {kind}") from None
        except redis.exceptions.ResponseError as error:
            if self.breaker is not None:
                self.breaker.record_success()
            raise ScriptError(str(error)) from None
        if self.breaker is not None:
            self.breaker.record_success()
        return result

    def close(self) -> None:
        self.client.close()
