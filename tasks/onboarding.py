"""Onboarding tasks (DESIGN.md §9), on queue ``onboarding``."""

from __future__ import annotations

from typing import Any

from worker.app import app
from worker.errors import InvalidEntry
from worker.personality import configure_personality as upsert
from worker.runtime import get_runtime


@app.task(name="onboarding.configure_personality")
def configure_personality(collection: Any, token_id: Any, config: Any) -> dict[str, Any]:
    """Create or update the personality of ``(collection, token_id)``; ``rejected`` on bad input."""
    runtime = get_runtime()
    try:
        return upsert(
            runtime.state, env=runtime.settings.env, collection=collection, token_id=token_id, config=config
        )
    except InvalidEntry as error:
        return {"status": "rejected", "reason": str(error)}
