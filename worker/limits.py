"""Numeric bounds shared by Python and Lua. Every amount and token is an ``int`` in base units."""

from __future__ import annotations

#: Largest integer a Lua 5.1 double (Redis scripting) represents exactly: 2**53 - 1.
MAX_SAFE_INTEGER = 9_007_199_254_740_991

#: Default credit cap per wallet, base units (1M USDC at 6 decimals).
DEFAULT_MAX_CREDIT_BALANCE = 1_000_000_000_000

#: Default lifetime of a credit balance and its notes, seconds (7 days).
DEFAULT_CREDIT_TTL_SECONDS = 604_800


def is_safe_int(value: object) -> bool:
    """True when ``value`` is an ``int`` (not ``bool``) in ``[0, MAX_SAFE_INTEGER]``."""
    return type(value) is int and 0 <= value <= MAX_SAFE_INTEGER
