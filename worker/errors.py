"""The project's own exception types.

Errors from libraries (redis-py, pydantic, OS) are translated into these at the module boundary
that talks to the library, so callers handle one vocabulary. None of the messages ever contains a
credential: URLs are shown through :func:`worker.redaction.redact_url`.
"""

from __future__ import annotations


class BillingError(Exception):
    """Base class of every error raised on purpose by billing-worker."""


class ConfigError(BillingError):
    """A ``BILLING_*`` setting is missing or invalid. The message is one line naming the variable."""


class InvalidEntry(BillingError):
    """A billing entry or request failed validation.

    ``field`` names the offending field (``"payload"`` when the whole payload is wrong) and
    ``reason`` says why, in words fit for the task result's ``reason``.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class InvalidAmount(BillingError, ValueError):
    """An amount or token is not an integer in ``[0, 2**53 - 1]`` (or is out of its own range)."""


class RedisUnavailable(BillingError):
    """The state Redis did not answer (refused, reset, timed out, or the circuit breaker is open).

    Never raised for an *answer* such as ``STALE`` or ``CORRUPT``: those are outcomes.
    """


class ScriptError(BillingError):
    """A Lua script refused its arguments (a bug on our side, never an outage)."""


class LeaseBusy(BillingError):
    """The partition's writer lease is held by another holder (``holder``)."""

    def __init__(self, partition: int, holder: str) -> None:
        super().__init__(f"partition {partition}: writer lease held by {holder!r}")
        self.partition = partition
        self.holder = holder


class LeaseNotOwnedError(BillingError):
    """The lease is no longer ours (expired, released, or taken over): do not write with it."""


class TokenOverflow(BillingError):
    """The next fencing token would exceed ``2**53 - 1``; the lease was released, not taken."""


class WalError(BillingError):
    """Base class of write-ahead-log errors."""


class WalCorruption(WalError):
    """A record failed its CRC (or framing) somewhere other than the torn tail: fail closed.

    ``path`` and ``offset`` name the first bad byte range so an operator can inspect it.
    """

    def __init__(self, path: str, offset: int, detail: str) -> None:
        super().__init__(f"{path}@{offset}: {detail}")
        self.path = path
        self.offset = offset
        self.detail = detail


class StaleTokenError(WalError):
    """Storage-side fencing: an append carried a non-zero token lower than the partition's highest."""

    def __init__(self, token: int, highest: int) -> None:
        super().__init__(f"fencing token {token} is below the partition's highest token {highest}")
        self.token = token
        self.highest = highest


class PartitionCountMismatch(ConfigError):
    """``BILLING_PARTITIONS`` differs from the count recorded for this environment's WAL."""


class RetryLater(BillingError):
    """The entry cannot be decided now and must be retried (the message is kept).

    ``kind`` is ``"busy"`` (another writer holds the partition), ``"stale"`` (a newer writer
    exists) or ``"corrupt"`` (fencing or balance state is corrupt: fail closed until repaired).
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class InvalidRecord(WalError, ValueError):
    """A record handed to the WAL is malformed (type, token range, entry_id, body): nothing written."""


class WalInvariantError(WalError):
    """An append would break the log's rules: nothing was written.

    The rules: one ENTRY per ``entry_id``; an outcome (APPLIED, NO_CREDIT, CAP_EXCEEDED) only for an
    ENTRY that is still pending; one CREDIT_USED per request id. Callers decide with
    ``classify``/``lookup``/``credit_use`` under ``Partition.locked()`` before appending.
    """
