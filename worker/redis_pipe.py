"""Many EVALSHA calls of one script in one pipelined round trip, without redis-py's packing.

Why this exists: replay pipelines tens of thousands of ``credit_issue`` calls, and redis-py's
``Pipeline`` spends about 20 µs per 9-argument call before anything reaches the socket (every
argument goes through ``Encoder.encode`` and its ``isinstance`` checks, each command through the
Python packer, the per-command response callbacks), plus a ``SCRIPT EXISTS`` per ``execute``.
That put the replay client at about 50 µs per record against about 11-14 µs of Redis work. Here
each call is packed by ``hiredis.pack_command`` (C, under 1 µs), all calls of a chunk go out
in one buffer on one connection taken from the client's own pool, and the replies are read back
with that connection's parser (``read_response``), so timeouts, the hiredis reader and the
connection's error mapping stay redis-py's.

What the caller gets is what redis-py would give: one reply per call in order, an error reply
as its ``ResponseError`` value (returned, not raised, so one bad call does not hide the others),
and ``ConnectionError`` / ``TimeoutError`` raised for no answer. ``NOSCRIPT`` (a ``SCRIPT FLUSH``
or a restarted Redis) is handled here: the script is loaded and only the calls that answered
``NOSCRIPT`` are sent again; every script sent this way must therefore be safe to run again
after a lost reply (``credit_issue`` is: a retried note answers ``DUPLICATE``). A connection is
handed back to the pool only after every reply sent on it was read; on any error it is
disconnected first, so a half-read connection never goes back dirty.

Error translation (RedisUnavailable / ScriptError), the circuit breaker and the bounded retry
stay with the caller: run :func:`evalsha_many` inside :meth:`worker.state_redis.StateRedis.call`,
or :class:`SentCalls` (send now, read later) inside ``StateRedis.start_call``, as
:meth:`worker.credit.CreditLedger.start_issue` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, ResponseError

#: How many times the calls that answered NOSCRIPT are sent again after loading the script.
NOSCRIPT_RETRIES = 2


def pack_evalsha(sha: str, numkeys: int, calls: Sequence[Sequence[str]]) -> list[bytes]:
    """The RESP bytes of ``EVALSHA sha numkeys *call`` for each call (keys first, then args)."""
    head = ("EVALSHA", sha, str(numkeys))
    pack = hiredis.pack_command
    return [pack((*head, *call)) for call in calls]  # type: ignore[arg-type]


def evalsha_many(client: redis.Redis, script: Script, numkeys: int, calls: Sequence[Sequence[str]]) -> list[Any]:
    """Run ``script`` once per call (``numkeys`` keys, then the arguments) in one round trip.

    Returns the replies in call order; an error reply is its ``ResponseError`` instance. Raises
    redis-py's ``ConnectionError`` / ``TimeoutError`` when Redis does not answer (some calls may
    have run: the caller retries them all, so ``script`` must be idempotent).
    """
    return SentCalls(client, script, numkeys, calls).replies()


class SentCalls:
    """:func:`evalsha_many` in two halves: constructing one packs and sends the calls (raising
    ``ConnectionError`` / ``TimeoutError`` when that fails); :meth:`replies` reads the answers.
    Between the two the connection is this object's: call :meth:`replies` or :meth:`close`."""

    def __init__(
        self,
        client: redis.Redis,
        script: Script,
        numkeys: int,
        calls: Sequence[Sequence[str]],
        packed: list[bytes] | None = None,
    ) -> None:
        """``packed``: the calls as :func:`pack_evalsha` gave them, when the caller packed them
        ahead (replay packs the next chunk while Redis runs this one)."""
        self._script = script
        self._packed = packed if packed is not None else pack_evalsha(script.sha, numkeys, calls)
        self._pool = client.connection_pool
        self._conn: Any = None  # redis-py's Connection methods are untyped
        self._sent: Sequence[int] = range(len(calls))
        if not calls:
            return
        self._conn = self._pool.get_connection()
        self._send()

    def _send(self) -> None:
        packed = self._packed
        try:
            self._conn.send_packed_command([b"".join([packed[i] for i in self._sent])])
        except BaseException:
            self.close()
            raise

    def replies(self) -> list[Any]:
        """The replies in call order (an error reply as its ``ResponseError``); the connection
        goes back to the pool. ``NOSCRIPT`` answers: script loaded, those calls sent again."""
        replies: list[Any] = [None] * len(self._packed)
        conn = self._conn
        if conn is None:
            if self._packed:
                raise RuntimeError("replies already read, or the calls discarded")
            return replies
        try:
            for attempt in range(NOSCRIPT_RETRIES + 1):
                read = conn.read_response
                for i in self._sent:
                    try:
                        replies[i] = read()
                    except ResponseError as error:  # an in-band error reply: the connection stays in step
                        replies[i] = error
                missing = [i for i in self._sent if isinstance(replies[i], NoScriptError)]
                if not missing or attempt == NOSCRIPT_RETRIES:
                    break
                conn.send_command("SCRIPT", "LOAD", self._script.script)
                conn.read_response()
                self._sent = missing
                self._send()
        except BaseException:
            self.close()
            raise
        self._conn = None
        self._pool.release(conn)
        return replies

    def close(self) -> None:
        """Give the connection back without reading: disconnected first, so never dirty."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.disconnect()  # replies may be in flight: never hand this connection back in step
            finally:
                self._pool.release(conn)
