"""Baseline tasks for ``bench/e2e_bench.py``, registered in the same worker with ``-I bench.baseline_tasks``.

* ``bench.bare_incrby``: the least a billing task can do: one ``INCRBY`` of the wallet's credit
  on the state Redis. No validation, no log, no fencing, no idempotency.
* ``bench.pg_entry``: the peer a team would build instead of the WAL + Redis design: the same
  entry in one PostgreSQL transaction (``synchronous_commit = on``): an idempotent insert of the
  entry, the wallet's balance raised only under the cap (upsert of the wallet row), the entry's
  outcome recorded, commit.

Both keep one client per worker process, created lazily on first use after the prefork fork
(a connection inherited across ``fork`` would be shared by two processes). They read their
targets from the environment of the worker: ``BILLING_REDIS_URL``, ``BILLING_ENV`` and
``BENCH_PG_DSN``.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery.signals import worker_process_init

from worker.app import app

#: Same cap as the real worker's default (1M USDC in 6-decimal base units).
CAP = int(os.environ.get("BILLING_MAX_CREDIT_BALANCE", "1000000000000"))

_redis: redis.Redis | None = None
_redis_pid = 0
_pg: Any = None
_pg_pid = 0


@worker_process_init.connect
def _forget_clients(**_: Any) -> None:
    """After fork: drop anything inherited (never close it: the parent's socket is shared)."""
    global _redis, _pg
    _redis = None
    _pg = None


def _state_redis() -> redis.Redis:
    """One connection pool per process, built on first use (after fork)."""
    global _redis, _redis_pid
    if _redis is None or _redis_pid != os.getpid():
        _redis = redis.Redis.from_url(os.environ["BILLING_REDIS_URL"], decode_responses=True)
        _redis_pid = os.getpid()
    return _redis


def _credit_due(payload: dict[str, Any]) -> int:
    return max(int(payload["quoted_amount"]) - int(payload["actual_amount"]), 0)


@app.task(name="bench.bare_incrby")
def bare_incrby(payload: dict[str, Any]) -> dict[str, Any]:
    """One INCRBY of the wallet's bench balance on the state Redis."""
    env = os.environ.get("BILLING_ENV", "bench")
    balance = _state_redis().incrby(f"bench:{{{env}:{payload['wallet'].lower()}}}:balance", _credit_due(payload))
    return {"entry_id": payload["entry_id"], "status": "credited", "balance": str(balance)}


# --- the PostgreSQL peer ---------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    entry_id      text PRIMARY KEY,
    wallet        text NOT NULL,
    quote_id      text NOT NULL,
    quoted_amount bigint NOT NULL,
    actual_amount bigint NOT NULL,
    status        text NOT NULL DEFAULT 'pending',
    amount        bigint,
    balance       bigint,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS wallets (
    wallet  text PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0)
);
"""

INSERT_ENTRY = """
INSERT INTO entries (entry_id, wallet, quote_id, quoted_amount, actual_amount)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (entry_id) DO NOTHING
RETURNING entry_id
"""
# The balance is raised only under the cap; the wallet row is created on its first credit.
RAISE_UNDER_CAP = """
INSERT INTO wallets AS w (wallet, balance) VALUES (%(wallet)s, %(delta)s)
ON CONFLICT (wallet) DO UPDATE SET balance = w.balance + %(delta)s
    WHERE w.balance + %(delta)s <= %(cap)s
RETURNING balance
"""
RECORD_OUTCOME = "UPDATE entries SET status = %s, amount = %s, balance = %s WHERE entry_id = %s"
READ_ENTRY = "SELECT status, amount, balance FROM entries WHERE entry_id = %s"


def _pg_conn() -> Any:
    """One connection per process, opened on first use (after fork), synchronous_commit on."""
    global _pg, _pg_pid
    if _pg is None or _pg_pid != os.getpid() or _pg.closed:
        import psycopg

        _pg = psycopg.connect(os.environ["BENCH_PG_DSN"], autocommit=True)  # transaction() is BEGIN..COMMIT
        _pg.execute("SET synchronous_commit = on")
        _pg_pid = os.getpid()
    return _pg


@app.task(name="bench.pg_entry")
def pg_entry(payload: dict[str, Any]) -> dict[str, Any]:
    """The same entry in one PostgreSQL transaction: idempotent, capped, committed durably."""
    entry_id = payload["entry_id"]
    wallet = payload["wallet"].lower()
    quoted, actual = int(payload["quoted_amount"]), int(payload["actual_amount"])
    delta = max(quoted - actual, 0)
    conn = _pg_conn()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(INSERT_ENTRY, (entry_id, wallet, payload["quote_id"], quoted, actual))
        if cur.fetchone() is None:  # already recorded: answer the original outcome
            cur.execute(READ_ENTRY, (entry_id,))
            status, _amount, balance = cur.fetchone()
            return {"entry_id": entry_id, "status": "duplicate", "original": status, "balance": str(balance)}
        if delta == 0:
            status, balance = "no_credit", None
        elif delta > CAP:
            status, balance = "cap_exceeded", None
        else:
            cur.execute(RAISE_UNDER_CAP, {"wallet": wallet, "delta": delta, "cap": CAP})
            row = cur.fetchone()
            status, balance = ("credited", row[0]) if row is not None else ("cap_exceeded", None)
        cur.execute(RECORD_OUTCOME, (status, delta or None, balance, entry_id))
    result = {"entry_id": entry_id, "status": status, "amount": str(delta)}
    if balance is not None:
        result["balance"] = str(balance)
    return result
