"""A real ``redis-server`` the tests own: start, SIGKILL, SIGSTOP/SIGCONT, restart.

Built on pytest-redis's :class:`RedisExecutor` (mirakuru), on a free port with its own data dir,
so a test may kill, pause or restart it without touching the shared Redis on 6379.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import redis
from port_for import get_port
from pytest_redis.executor import RedisExecutor


class RedisServer:
    """One private redis-server process."""

    def __init__(
        self,
        datadir: Path,
        *,
        password: str | None = None,
        appendonly: bool = False,
        username: str | None = None,
    ) -> None:
        self.datadir = datadir
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.port: int = get_port(None)  # type: ignore[assignment]
        self.password = password
        self.username = username
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not on PATH (run scripts/bootstrap.sh)")
        self._executor = RedisExecutor(
            executable,
            databases=16,
            redis_timeout=30,
            loglevel="warning",
            host="127.0.0.1",
            port=self.port,
            password=password,
            appendonly="yes" if appendonly else "no",
            datadir=datadir,
            startup_timeout=30,
        )
        if appendonly:
            self._executor.command_parts += ["--appendfsync", "always"]
        self._paused = False

    @property
    def url(self) -> str:
        if self.password is not None:
            user = self.username or ""
            return f"redis://{user}:{self.password}@127.0.0.1:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, password=self.password, decode_responses=True
        )

    def start(self) -> RedisServer:
        self._executor.start()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections reset."""
        if self._paused:
            self.resume()
        self._executor.kill(sig=signal.SIGKILL)

    def stop(self) -> None:
        if self._paused:
            self.resume()
        if self._executor.running():
            self._executor.kill(sig=signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the port accepts connections (kernel backlog) but nothing answers."""
        assert self._executor.process is not None
        os.kill(self._executor.process.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._executor.process is not None
        os.kill(self._executor.process.pid, signal.SIGCONT)
        self._paused = False

    def restart(self, *, empty: bool = False) -> None:
        """Kill and start again on the same port; ``empty`` drops the data files first."""
        self.kill()
        if empty:
            for path in self.datadir.iterdir():
                if path.name.startswith(("dump", "appendonly")):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        self.start()
