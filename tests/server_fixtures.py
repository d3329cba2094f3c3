"""Server test helpers: the real tiny engine, a real uvicorn server on 127.0.0.1 (random port) in a thread, and
waiting for the engine to be idle. A test module gets the fixtures with `pytest_plugins = ("server_fixtures",)`
(pytest puts tests/ on sys.path: the folder has no __init__.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from omnivox.engine.engine import Engine, EngineConfig
from omnivox.server.app import build_app, build_server, uvicorn_config
from omnivox.server.serving import ServerConfig, SpeechService

# With random weights the server scripts every reply (ServerConfig.dummy_weights): audio lengths are known.
TEST_CONFIG = ServerConfig(dummy_weights=True, max_input_chars=400)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> from a background thread, with `omnivox serve`'s limits and
    draining shutdown (`should_exit` is what SIGTERM sets)."""

    def __init__(self, app: Any):
        self.app = app
        self.server = build_server(uvicorn_config(app, "127.0.0.1", 0, "warning", ws_ping_interval=None))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/v1/stream"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def service(self) -> SpeechService:
        return self.app.state.service

    def wait_idle(self, timeout_s: float = 10.0) -> dict:
        return wait_idle(self.service.engine, timeout_s)

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/readyz").status_code == 200:
                return
            assert self.service.status != "failed", self.service.failure
            time.sleep(0.02)
        raise AssertionError(f"server not ready after {timeout_s} s (status {self.service.status})")


def wait_idle(engine: Engine, timeout_s: float = 10.0) -> dict:
    """Poll until no stream is alive and no cache is held; returns the last engine.stats()."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats()
        idle = stats["live_requests"] == 0 and stats["cache_bytes"] == 0 and stats["sessions_open"] == 0
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


@pytest.fixture(scope="session")
def server_engine() -> Engine:
    """The embedded tiny random-weight model on the CPU, shared by every server test."""
    return Engine.from_pretrained(None, device="cpu", progress=False)


@pytest.fixture(scope="session")
def server(server_engine: Engine) -> Iterator[LiveServer]:
    with LiveServer(build_app(server_engine, TEST_CONFIG)) as live:
        live.wait_ready()
        yield live


# The fast path (on a CPU: static caches and slot pools, steps without graphs) with few slots, so that a leaked
# session shows within a handful of requests: 3 streams, 3 engine sessions, 2 WebSocket chat sessions.
FAST_CONFIG = EngineConfig(path="fast", max_concurrent_requests=3, max_sessions=3)
FAST_SERVER_CONFIG = ServerConfig(dummy_weights=True, max_input_chars=400, max_ws_sessions=2)


@pytest.fixture(scope="session")
def fast_engine() -> Engine:
    """The embedded tiny model on the fast path (as `omnivox serve` runs it by default)."""
    return Engine.from_pretrained(None, device="cpu", progress=False, config=FAST_CONFIG)


@pytest.fixture(scope="session")
def fast_server(fast_engine: Engine) -> Iterator[LiveServer]:
    with LiveServer(build_app(fast_engine, FAST_SERVER_CONFIG)) as live:
        live.wait_ready()
        yield live


@pytest.fixture(scope="session")
def server_factory() -> type[LiveServer]:
    """The LiveServer class, for tests that need a server of their own: `with server_factory(app) as live: ...`."""
    return LiveServer
