"""Onboarding personality upsert (DESIGN.md §9) against a real redis-server."""

from __future__ import annotations

import threading

import pytest

from worker.errors import InvalidEntry
from worker.personality import configure_personality, personality_key
from worker.state_redis import StateRedis


def test_creates_personality_via_null_check_when_none_exists(state: StateRedis, env_name: str) -> None:
    result = configure_personality(state, env=env_name, collection="apes", token_id="42", config={})
    assert result == {
        "status": "created",
        "personality": {"name": "Agent 42", "voice": "analytical", "domains": [], "instructions": ""},
    }


def test_updates_personality_via_null_check_when_one_exists(state: StateRedis, env_name: str) -> None:
    configure_personality(state, env=env_name, collection="apes", token_id="7", config={"voice": "warm"})
    result = configure_personality(
        state, env=env_name, collection="apes", token_id="7", config={"domains": ["defi", "nft"]}
    )
    assert result["status"] == "updated"
    assert result["personality"] == {
        "name": "Agent 7",
        "voice": "warm",
        "domains": ["defi", "nft"],
        "instructions": "",
    }


def test_no_exception_thrown_during_normal_null_check_flow(state: StateRedis, env_name: str) -> None:
    # Neither branch raises: the null-check is explicit, inside the script.
    for expected in ("created", "updated", "updated"):
        result = configure_personality(
            state, env=env_name, collection="c", token_id="1", config={"name": "Zed"}
        )
        assert result["status"] == expected
        assert result["personality"]["name"] == "Zed"


def test_concurrent_upserts_one_create_one_update_no_lost_field(state: StateRedis, env_name: str) -> None:
    for round_no in range(20):
        token = f"race{round_no}"
        results: list[dict[str, object]] = []
        barrier = threading.Barrier(2)

        def call(
            config: dict[str, object],
            token: str = token,
            barrier: threading.Barrier = barrier,
            results: list[dict[str, object]] = results,
        ) -> None:
            barrier.wait()
            results.append(
                configure_personality(state, env=env_name, collection="c", token_id=token, config=config)
            )

        threads = [
            threading.Thread(target=call, args=({"voice": "bold"},)),
            threading.Thread(target=call, args=({"instructions": "be brief"},)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(r["status"] for r in results) == ["created", "updated"]  # type: ignore[type-var]
        stored = state.client.hgetall(personality_key(env_name, "c", token))
        assert stored["voice"] == "bold" and stored["instructions"] == "be brief"
        assert stored["name"] == f"Agent {token}"


@pytest.mark.parametrize(
    ("collection", "token_id", "config", "field"),
    [
        ("bad collection", "1", {}, "collection"),
        ("c", "", {}, "token_id"),
        ("c", "1", {"colour": "red"}, "config.colour"),
        ("c", "1", {"domains": "defi"}, "config.domains"),
        ("c", "1", {"name": ""}, "config.name"),
        ("c", "1", None, "config"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_field(
    state: StateRedis, env_name: str, collection: str, token_id: str, config: object, field: str
) -> None:
    with pytest.raises(InvalidEntry) as error:
        configure_personality(state, env=env_name, collection=collection, token_id=token_id, config=config)
    assert error.value.field == field
    assert state.client.keys(f"onboarding:personality:{{{env_name}:*") == []
