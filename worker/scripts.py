"""Load every ``lua/*.lua`` by file name into redis-py ``register_script`` (as dramatiq does).

A registered script runs with ``EVALSHA`` and falls back to ``EVAL`` on ``NOSCRIPT``, so a
``SCRIPT FLUSH`` or a restarted Redis is transparent. The scripts ship inside the wheel as
``worker/lua``; in a source checkout they are the top-level ``lua/`` directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis
from redis.commands.core import Script

_PACKAGE_DIR = Path(__file__).resolve().parent


def lua_dir() -> Path:
    """The directory holding the scripts: ``worker/lua`` when installed, else ``<repo>/lua``."""
    for candidate in (_PACKAGE_DIR / "lua", _PACKAGE_DIR.parent / "lua"):
        if (candidate / "fence_validate_advance.lua").is_file():
            return candidate
    raise FileNotFoundError(f"no Lua scripts next to {_PACKAGE_DIR} (looked in lua/ and ../lua/)")


def read_script(name: str) -> str:
    """Source of ``<name>.lua``."""
    return (lua_dir() / f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Scripts:
    """The six contract scripts (DESIGN.md §4) and the onboarding upsert, registered on one client."""

    fence_validate_advance: Script
    lease_acquire: Script
    lease_renew: Script
    lease_release: Script
    credit_issue: Script
    credit_apply: Script
    personality_upsert: Script

    @classmethod
    def register(cls, client: redis.Redis) -> Scripts:
        """Register every script named by a field of this class from ``lua/<field>.lua``."""
        names = cls.__dataclass_fields__
        return cls(**{name: client.register_script(read_script(name)) for name in names})
