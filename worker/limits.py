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


def parse_canonical(raw: str | None) -> int | None:
    """The value of a canonical decimal integer string in ``[0, MAX_SAFE_INTEGER]`` (no sign,
    blank, leading zero, dot or exponent; ASCII digits only), else ``None``. Mirrors the
    ``canonical`` function of the Lua scripts."""
    if raw is None or not 0 < len(raw) <= 16 or not raw.isascii() or not raw.isdigit():
        return None
    if len(raw) > 1 and raw[0] == "0":
        return None
    value = int(raw)
    return value if value <= MAX_SAFE_INTEGER else None
