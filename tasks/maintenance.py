"""Beat-scheduled maintenance: replay, checkpoint, backlog gauge (DESIGN.md §3)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from worker.app import app
from worker.runtime import get_runtime


@app.task(name="billing.replay_pending")
def replay_pending(partition: int | None = None) -> list[dict[str, Any]]:
    """Apply pending WAL entries: of ``partition``, or of every partition when ``None``."""
    pipeline = get_runtime().pipeline
    reports = pipeline.replay_all() if partition is None else [pipeline.replay_partition(partition)]
    return [asdict(report) for report in reports]


@app.task(name="billing.checkpoint")
def checkpoint() -> dict[str, int]:
    """Persist WAL cursors and retire fully applied segments; segments retired per partition."""
    return {str(p): n for p, n in get_runtime().pipeline.checkpoint().items()}


@app.task(name="billing.report_backlog")
def report_backlog() -> dict[str, int]:
    """Set the ``billing_pending`` gauge; pending entries per partition."""
    return {str(p): n for p, n in get_runtime().pipeline.report_backlog().items()}
