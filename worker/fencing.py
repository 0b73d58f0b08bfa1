"""Writer leases and validate-and-advance fencing per (environment, WAL partition).

A writer takes the partition's lease with :meth:`Fencing.acquire` and receives a monotonic
fencing token, then runs :meth:`Fencing.validate_and_advance` (the Lua compare-and-swap) before
it writes. Only ``OK`` lets it write; ``STALE`` means a newer writer exists; ``CORRUPT`` means the
stored watermark (or the token) is not a canonical integer in ``[0, 2**53 - 1]`` and the writer
must fail closed; ``UNAVAILABLE`` means Redis did not answer and the caller decides to fail open.

The lease knows its own deadline (``time.monotonic``): a holder whose lease may have expired
learns it before it writes (:meth:`Lease.ensure_held`), and :meth:`Fencing.renew` reports a lost
lease by raising :class:`~worker.errors.LeaseNotOwnedError` to the holder — nothing is swallowed
in a background thread.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from worker import keys
from worker.errors import (
    LeaseBusy,
    LeaseNotOwnedError,
    RedisUnavailable,
    ScriptError,
    TokenOverflow,
)
from worker.limits import MAX_SAFE_INTEGER, is_safe_int, parse_canonical
from worker.state_redis import StateRedis

#: Share of the lease TTL a holder may use before it must renew: margin for clock drift and the
#: round trip that took the lease (the Redis-side TTL started before our clock read).
LEASE_SAFETY = 0.8


class FenceResult(StrEnum):
    """Outcome of validate-and-advance."""

    OK = "OK"
    STALE = "STALE"
    CORRUPT = "CORRUPT"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class Lease:
    """A held writer lease. ``token`` is the fencing token minted with it."""

    partition: int
    holder: str
    token: int
    ttl_ms: int
    deadline: float  #: time.monotonic() after which the lease must be treated as lost
    released: bool = field(default=False)

    def is_held(self) -> bool:
        """True while the lease is ours as far as this process can tell (not released, not past
        its safe deadline)."""
        return not self.released and time.monotonic() < self.deadline

    def ensure_held(self) -> None:
        """Raise :class:`LeaseNotOwnedError` unless :meth:`is_held`."""
        if not self.is_held():
            state = "released" if self.released else "expired"
            raise LeaseNotOwnedError(f"partition {self.partition}: lease {state}")


class Fencing:
    """Lease and fencing operations of one environment on the state Redis."""

    def __init__(self, state: StateRedis, *, env: str, lease_ttl_ms: int) -> None:
        self._state = state
        self._scripts = state.scripts
        self.env = env
        self.lease_ttl_ms = lease_ttl_ms

    def acquire(self, partition: int, *, floor: int = 0) -> Lease:
        """Take ``partition``'s writer lease and mint a token above ``floor`` (the highest token
        in the partition's WAL), the counter and the watermark.

        Raises :class:`LeaseBusy` (held by someone else), :class:`TokenOverflow` (token would
        exceed 2**53-1; the lease was released), :class:`RedisUnavailable`.
        """
        if not is_safe_int(floor):
            raise ValueError(f"floor must be an int in [0, {MAX_SAFE_INTEGER}], got {floor!r}")
        holder = uuid.uuid4().hex
        started = time.monotonic()
        reply = self._state.run(
            self._scripts.lease_acquire,
            [
                keys.lease_lock(self.env, partition),
                keys.fence_counter(self.env, partition),
                keys.fence_watermark(self.env, partition),
            ],
            [holder, self.lease_ttl_ms, floor],
        )
        status, value = int(reply[0]), reply[1]
        if status == 1:
            deadline = started + self.lease_ttl_ms * LEASE_SAFETY / 1000
            return Lease(partition, holder, int(value), self.lease_ttl_ms, deadline)
        if status == -1:
            raise TokenOverflow(f"partition {partition}: next fencing token exceeds 2^53-1")
        if value == holder:
            # Our own SET NX landed but its reply was lost, and the retry saw our lock: we cannot
            # know the token, so give the lease back and report it busy (the caller retries).
            self._release(partition, holder)
        raise LeaseBusy(partition, str(value))

    def renew(self, lease: Lease) -> None:
        """Extend the lease by its TTL. Raises :class:`LeaseNotOwnedError` if it is no longer
        ours (the caller must stop writing), :class:`RedisUnavailable`."""
        lease.ensure_held()
        started = time.monotonic()
        renewed = self._state.run(
            self._scripts.lease_renew,
            [keys.lease_lock(self.env, lease.partition)],
            [lease.holder, lease.ttl_ms],
        )
        if int(renewed) != 1:
            lease.released = True
            raise LeaseNotOwnedError(f"partition {lease.partition}: lease taken over or expired")
        lease.deadline = started + lease.ttl_ms * LEASE_SAFETY / 1000

    def release(self, lease: Lease) -> bool:
        """Give the lease back; ``False`` if it was no longer ours. Never raises for an outage
        (the lease then simply expires): returns ``False``."""
        if lease.released:
            return False
        lease.released = True
        try:
            return self._release(lease.partition, lease.holder)
        except RedisUnavailable:
            return False

    def _release(self, partition: int, holder: str) -> bool:
        released = self._state.run(
            self._scripts.lease_release, [keys.lease_lock(self.env, partition)], [holder]
        )
        return int(released) == 1

    @contextmanager
    def lease(self, partition: int, *, floor: int = 0) -> Iterator[Lease]:
        """``with fencing.lease(p, floor=wal.highest_token) as lease:`` — released on exit."""
        held = self.acquire(partition, floor=floor)
        try:
            yield held
        finally:
            self.release(held)

    def validate_and_advance(self, lease: Lease) -> FenceResult:
        """Run the fencing CAS with ``lease.token``.

        Checked here first, without calling Redis: a lease this process no longer holds →
        ``STALE``; a token that is not an int in ``[1, 2**53-1]`` → ``CORRUPT``. A Redis that does
        not answer → ``UNAVAILABLE`` (never a silent ``OK``).
        """
        if not lease.is_held():
            return FenceResult.STALE
        return self.validate_token(lease.partition, lease.token)

    def validate_token(self, partition: int, token: int) -> FenceResult:
        """The CAS for a raw token (see :meth:`validate_and_advance`; no lease check)."""
        if not is_safe_int(token) or token == 0:
            return FenceResult.CORRUPT
        try:
            reply = self._state.run(
                self._scripts.fence_validate_advance,
                [keys.fence_watermark(self.env, partition)],
                [token],
            )
        except RedisUnavailable:
            return FenceResult.UNAVAILABLE
        except ScriptError:
            return FenceResult.CORRUPT
        return FenceResult(str(reply))

    def show(self, partition: int) -> dict[str, str | None]:
        """Raw lease holder, counter and watermark of ``partition`` (for ``fence show``)."""
        client = self._state.client
        return {
            "holder": self._state.call(lambda: client.get(keys.lease_lock(self.env, partition))),
            "counter": self._state.call(
                lambda: client.get(keys.fence_counter(self.env, partition))
            ),
            "watermark": self._state.call(
                lambda: client.get(keys.fence_watermark(self.env, partition))
            ),
        }

    def repair(self, partition: int, *, floor: int) -> int:
        """Operator repair of a CORRUPT fence: set counter and watermark to a canonical value
        above ``floor`` (the WAL's highest token) and above any readable current value. Returns
        the new watermark. Any holder's existing token is then STALE, by design."""
        if not is_safe_int(floor):
            raise ValueError(f"floor must be an int in [0, {MAX_SAFE_INTEGER}], got {floor!r}")
        current = self.show(partition)
        candidates = [floor]
        for raw in (current["counter"], current["watermark"]):
            value = parse_canonical(raw)
            if value is not None:
                candidates.append(value)
        value = max(candidates) + 1
        if value > MAX_SAFE_INTEGER:
            raise TokenOverflow(f"partition {partition}: repaired token would exceed 2^53-1")
        client = self._state.client
        self._state.call(
            lambda: client.mset(
                {
                    keys.fence_counter(self.env, partition): str(value),
                    keys.fence_watermark(self.env, partition): str(value),
                }
            )
        )
        return value
