"""Onboarding personalities (DESIGN.md §9): an atomic create-or-update in Lua.

The original did a read, then an update or a create chosen by an explicit null-check. Here the
null-check runs inside ``personality_upsert.lua``, so two concurrent calls give exactly one create
and one update and no field is lost; no exception is used for control flow.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.errors import InvalidEntry
from worker.models import Identifier
from worker.state_redis import StateRedis


class PersonalityConfig(BaseModel):
    """Fields a caller may set; omitted fields keep their stored (or default) value."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str | None = Field(default=None, min_length=1, max_length=200)
    voice: str | None = Field(default=None, min_length=1, max_length=100)
    domains: list[str] | None = Field(default=None, max_length=100)
    instructions: str | None = Field(default=None, max_length=10_000)


class PersonalityRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    collection: Identifier
    token_id: Identifier
    config: PersonalityConfig


def personality_key(env: str, collection: str, token_id: str) -> str:
    return f"onboarding:personality:{{{env}:{collection}}}:{token_id}"


def configure_personality(
    state: StateRedis, *, env: str, collection: object, token_id: object, config: object
) -> dict[str, Any]:
    """Create (name ``Agent <token_id>``, voice ``analytical``, empty domains and instructions) or
    update the personality, atomically. Returns ``{"status": "created"|"updated", "personality":
    {...}}``. Raises :class:`InvalidEntry` for a bad argument, RedisUnavailable on an outage."""
    try:
        request = PersonalityRequest.model_validate(
            {"collection": collection, "token_id": token_id, "config": config}
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ())) or "payload"
        raise InvalidEntry(field, str(first.get("msg", "invalid"))) from None
    pairs: list[str] = []
    for field, value in request.config.model_dump(exclude_none=True).items():
        pairs += [field, json.dumps(value) if field == "domains" else str(value)]
    reply = state.run(
        state.scripts.personality_upsert,
        [personality_key(env, request.collection, request.token_id)],
        [f"Agent {request.token_id}", *pairs],
    )
    status, flat = reply[0], reply[1:]
    stored = dict(zip(flat[0::2], flat[1::2], strict=True))
    stored["domains"] = json.loads(stored.get("domains", "[]"))
    return {"status": status, "personality": stored}

