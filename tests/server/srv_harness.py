"""Run a MiniInfer API server for tests: in a thread (fake engine) or a subprocess (real engine)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

API_KEY = "test-key-123"
LIVE_MAX_MODEL_LEN = 2048
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            r = httpx.get(base_url + "/health", timeout=2)
            last = (r.status_code, r.text)
            if r.status_code == 200:
                return
            if r.status_code == 503 and r.json().get("status") == "unhealthy":
                raise RuntimeError(f"server unhealthy: {r.text}")
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.1)
    raise TimeoutError(f"server at {base_url} not healthy after {timeout}s (last: {last})")


class ThreadServer:
    """uvicorn + create_app(AsyncEngine(factory)) in a background thread."""

    def __init__(self, factory: Callable[[], Any], wait: bool = True, **app_kwargs: Any) -> None:
        import uvicorn

        from miniinfer.server.api_server import create_app, uvicorn_config
        from miniinfer.server.async_engine import AsyncEngine

        max_header_bytes = app_kwargs.pop("max_header_bytes", 16 * 1024)
        self.engine = AsyncEngine(factory)
        self.app = create_app(self.engine, **app_kwargs)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(self.app, "127.0.0.1", self.port, max_header_bytes=max_header_bytes,
                                log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if wait:
            wait_healthy(self.base_url, 20)

    @property
    def raw_engine(self) -> Any:
        return self.engine._engine

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> "ThreadServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SubprocessServer:
    """``run_server(EngineConfig(**config_kwargs), ...)`` in a child Python process."""

    def __init__(self, config_kwargs: dict, api_key: str | None = None, max_n: int = 8,
                 max_body_bytes: int = 1 << 20, timeout: float = 240.0) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        code = textwrap.dedent(f"""
            from miniinfer.config import EngineConfig
            from miniinfer.server.api_server import run_server
            run_server(EngineConfig(**{config_kwargs!r}), "127.0.0.1", {self.port}, {api_key!r},
                       max_n={max_n}, max_body_bytes={max_body_bytes})
        """)
        env = dict(os.environ)
        env.pop("MINIINFER_API_KEY", None)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        fd, self.log_path = tempfile.mkstemp(prefix=f"miniinfer-server-{self.port}-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.base_url, timeout, self.proc)
        except Exception as e:
            self.close()
            raise RuntimeError(f"{e}\n--- server log ({self.log_path}) ---\n{self.log_tail()}") from e
        except BaseException:
            self.close()
            raise

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


class FakeSubprocessServer(SubprocessServer):
    """``run_server`` over a :class:`srv_fake_engine.FakeEngine` in a child process (real signal
    handling, fast start): ``fake_kwargs`` go to the fake, ``server_kwargs`` to ``run_server``."""

    def __init__(self, fake_kwargs: dict | None = None, timeout: float = 60.0, **server_kwargs: Any) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = server_kwargs.get("api_key")
        here = os.path.dirname(os.path.abspath(__file__))
        code = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {here!r})
            from srv_fake_engine import FakeEngine
            from miniinfer.server.api_server import run_server
            run_server(None, "127.0.0.1", {self.port}, engine_factory=lambda: FakeEngine(**{fake_kwargs or {}!r}),
                       **{server_kwargs!r})
            print("run_server returned", flush=True)
        """)
        env = dict(os.environ)
        env.pop("MINIINFER_API_KEY", None)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        fd, self.log_path = tempfile.mkstemp(prefix=f"miniinfer-fake-server-{self.port}-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.base_url, timeout, self.proc)
        except BaseException:
            tail = self.log_tail()
            self.close()
            raise RuntimeError(f"fake server did not come up; log:\n{tail}")
