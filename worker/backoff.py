"""Jittered, capped retry delays for entries that must wait (STALE, busy lease, CORRUPT).

"Full jitter" (AWS architecture blog): ``uniform(0, min(cap, base * 2**attempt))``. The cap is
``BILLING_RETRY_MAX_S``, which settings keep below the broker's visibility timeout, so a retried
message is never redelivered a second time while it waits.
"""

from __future__ import annotations

import random

#: First-retry scale per reason, seconds.
BASE_DELAY_S = {"busy": 0.02, "stale": 0.05, "corrupt": 1.0, "error": 1.0}

#: Smallest delay, seconds (keeps a hot retry loop from spinning).
MIN_DELAY_S = 0.01


def retry_delay(kind: str, attempt: int, cap_s: float, *, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based) for reason ``kind``."""
    base = BASE_DELAY_S.get(kind, 0.1)
    ceiling = min(cap_s, base * 2 ** min(attempt, 32))
    return max(MIN_DELAY_S, (rng or random).uniform(0, ceiling))
