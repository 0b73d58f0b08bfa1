"""A deterministic sample stream, as an upstream service would send it (demo, enqueue, bench).

Amounts are ``int`` base units (6-decimal USDC: 1_000_000 = 1 USDC). The stream contains
credits, no-credit entries, exact re-deliveries (duplicates), one conflicting re-use of an
``entry_id``, invalid payloads and, with a small cap, a wallet that runs over its cap.
"""

from __future__ import annotations

import random
from typing import Any


def wallet_address(n: int) -> str:
    """The ``n``-th sample wallet: ``0x`` + 40 hex digits."""
    return "0x" + f"{n:040x}"


def entry(entry_id: str, wallet: str, quoted: int, actual: int) -> dict[str, Any]:
    return {
        "entry_id": entry_id,
        "wallet": wallet,
        "quote_id": f"q-{entry_id}",
        "quoted_amount": str(quoted),
        "actual_amount": actual,
    }


def sample_entries(
    count: int, *, wallets: int = 10, seed: int = 7, prefix: str = "e"
) -> list[dict[str, Any]]:
    """``count`` valid entries over ``wallets`` wallets; about 80% earn a credit."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        quoted = rng.randrange(100_000, 5_000_000)
        actual = rng.randrange(0, quoted) if rng.random() < 0.8 else quoted + rng.randrange(0, 50_000)
        out.append(entry(f"{prefix}{i:06d}", wallet_address(rng.randrange(wallets) + 1), quoted, actual))
    return out


def demo_stream(*, cap: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Two phases of the demo: (before the outage, during the outage). Uses wallet 1..6;
    wallet 6 receives more than ``cap`` in total so part of it is refused."""
    first = sample_entries(24, wallets=5, prefix="pay-a")
    first.append(dict(first[0]))  # an exact re-delivery: duplicate
    first.append(dict(first[3]))
    conflict = dict(first[1])
    conflict["actual_amount"] = 1  # same entry_id, other content: rejected
    first.append(conflict)
    first.append(
        {"entry_id": "bad-1", "wallet": "0x1234", "quote_id": "q", "quoted_amount": "5", "actual_amount": 1}
    )
    first.append({**entry("bad-2", wallet_address(2), 10, 1), "quoted_amount": 1.5})
    over_cap = wallet_address(6)
    per_note = cap // 3 + 1
    first += [entry(f"cap-{i}", over_cap, per_note, 0) for i in range(4)]
    second = sample_entries(12, wallets=5, seed=11, prefix="pay-b")
    second.append(dict(second[0]))
    return first, second
