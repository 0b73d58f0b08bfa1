"""deploy/Dockerfile, read as text (no Docker engine here)."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib

import pytest

from tests.deploy._support import DEPLOY, REPO, dockerfile_instructions
from worker.settings import ENV_PREFIX, Settings

DOCKERFILE = DEPLOY / "Dockerfile"


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE)


def _args(instructions: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in instructions if instruction == name]


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args(instructions, "ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def test_based_on_python_311_slim(instructions: list[tuple[str, str]]) -> None:
    args = dict(a.split("=", 1) for a in _args(instructions, "ARG") if "=" in a)
    for base in _args(instructions, "FROM"):
        image = base.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert image == "python:3.11-slim", base


def test_runs_as_a_numeric_non_root_user(instructions: list[tuple[str, str]]) -> None:
    users = _args(instructions, "USER")
    assert users, "no USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"USER must be numeric (uid[:gid]), got {users[-1]!r}"
    assert int(match.group(1)) != 0 and int(match.group(2) or 1) != 0
    # USER comes after the last RUN: nothing runs as root at container start.
    names = [i for i, _ in instructions]
    assert max(i for i, n in enumerate(names) if n == "RUN") < max(
        i for i, n in enumerate(names) if n == "USER"
    )


def test_wal_volume_and_settings(instructions: list[tuple[str, str]]) -> None:
    env = _env(instructions)
    assert env["BILLING_WAL_DIR"] == "/var/lib/billing/wal"
    volumes = " ".join(_args(instructions, "VOLUME"))
    assert "/var/lib/billing/wal" in volumes
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    run = " ".join(_args(instructions, "RUN"))
    assert env["PROMETHEUS_MULTIPROC_DIR"] in run, "the multiprocess dir must be created (writable)"
    assert "chown" in run


def test_installs_the_project_non_editable(instructions: list[tuple[str, str]]) -> None:
    runs = _args(instructions, "RUN")
    installs = [r for r in runs if re.search(r"\bpip install\b", r)]
    assert any(re.search(r"\bpip install (?:[^&|;]* )?\"?\.(?:\[[a-z,]+\])?\"?(?:\s|$)", r) for r in installs)
    for run in installs:
        assert not re.search(r"(?:^|\s)(?:-e|--editable)(?:\s|=|$)", run), run


def test_copies_everything_the_wheel_build_needs(instructions: list[tuple[str, str]]) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    needed = set(pyproject["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]) | {"pyproject.toml"}
    needed |= set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"])
    copied = set()
    for args in _args(instructions, "COPY"):
        tokens = [t for t in shlex.split(args) if not t.startswith("--")]
        if "--from=" not in args:
            copied |= {t.rstrip("/") for t in tokens[:-1]}
    assert needed <= copied, f"not copied into the build: {sorted(needed - copied)}"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    for path in copied:
        assert f"!{path}" in ignore or f"!{path}/" in ignore, f"{path} excluded by Dockerfile.dockerignore"


def test_default_command_and_healthcheck(instructions: list[tuple[str, str]]) -> None:
    cmd = json.loads(_args(instructions, "CMD")[-1])
    assert cmd[:7] == ["celery", "-A", "worker.app", "worker", "-Q", "billing,onboarding", "--loglevel=INFO"]
    health = _args(instructions, "HEALTHCHECK")
    assert health and "CMD" in health[-1]
    assert "9808" in _args(instructions, "EXPOSE")[-1]


def test_entrypoint_script_is_executable_and_execs(instructions: list[tuple[str, str]]) -> None:
    script = DEPLOY / "docker-entrypoint.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text(encoding="utf-8")
    assert 'exec "$@"' in text
    assert "PROMETHEUS_MULTIPROC_DIR" in text


def test_every_billing_variable_in_deploy_is_a_settings_field() -> None:
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    seen: dict[str, set[str]] = {}
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix not in {".pyc"}:
            for name in re.findall(r"\bBILLING_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")):
                seen.setdefault(name, set()).add(str(path.relative_to(DEPLOY)))
    unknown = {name: files for name, files in seen.items() if name not in fields}
    assert not unknown, f"not Settings fields: {unknown}"
