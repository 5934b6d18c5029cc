"""Shared pieces of the reliability suite (issue #11): the real-engine server in a subprocess,
probes of its state (/api/stats, /metrics, /proc/<pid>, its log) and the CI / full sizes.

``MINIINFER_RELIABILITY_FULL=1`` selects the issue's sizes (``make reliability``); without it
the tests run the CI sizes. The servers run with ``OMP_NUM_THREADS=1`` (see ``Probe``). ``MINIINFER_RELIABILITY_REPORT=<file>`` appends each test's
figures to that file as one JSON line (they are printed too: run pytest with ``-s``).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "server"))

from srv_harness import SubprocessServer  # noqa: E402

FULL = os.environ.get("MINIINFER_RELIABILITY_FULL", "") not in ("", "0")
REPORT = os.environ.get("MINIINFER_RELIABILITY_REPORT")

# the live server's settings (tests/server/conftest.py), no API key
BASE_CONFIG = {"model": None, "max_model_len": 2048, "device": "cpu", "max_num_seqs": 64,
               "kv_cache_memory_gb": 0.5}


def size(ci: int, full: int) -> int:
    """``full`` under MINIINFER_RELIABILITY_FULL=1, else ``ci``; an explicit override
    ``MINIINFER_RELIABILITY_SCALE=<float>`` multiplies the CI size (for local experiments)."""
    if FULL:
        return full
    scale = float(os.environ.get("MINIINFER_RELIABILITY_SCALE", "1"))
    return max(1, int(ci * scale))


def engine_importable() -> str | None:
    try:
        from miniinfer.engine.llm_engine import LLMEngine  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


class Probe:
    """A SubprocessServer plus what the tests read from it."""

    def __init__(self, **overrides) -> None:
        # One OpenMP thread for the server (MINIINFER_RELIABILITY_OMP_THREADS=<n> for another
        # count): on 2 shared cores the default (one thread per core) waits at every barrier for
        # a thread the test client or another process preempted, and requests take ~10x longer
        # (see docs/RELIABILITY.md).
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = os.environ.get("MINIINFER_RELIABILITY_OMP_THREADS", "1")
        try:
            self.srv = SubprocessServer({**BASE_CONFIG, **overrides}, api_key=None, max_n=8, timeout=300)
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        self.base_url = self.srv.base_url
        self.port = self.srv.port
        self.pid = self.srv.proc.pid
        self.http = httpx.Client(base_url=self.base_url, timeout=60)
        self.model = self.http.get("/v1/models").json()["data"][0]["id"]

    def close(self) -> None:
        self.http.close()
        keep = os.environ.get("MINIINFER_RELIABILITY_LOGDIR")  # keep the server log there
        if keep:
            os.makedirs(keep, exist_ok=True)
            with open(os.path.join(keep, f"server-{self.port}.log"), "w") as f:
                f.write(self.log())
        self.srv.close()

    # ------------------------------------------------------------------ server state
    def stats(self) -> dict:
        return self.http.get("/api/stats").json()

    def metrics(self) -> str:
        return self.http.get("/metrics").text

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """Polls /api/stats until 0 running, 0 waiting and every KV block free (or fails)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if (s["num_requests_running"] == 0 and s["num_requests_waiting"] == 0
                    and s["num_free_kv_blocks"] == s["num_kv_blocks"]):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {s}")
            time.sleep(0.1)

    def assert_idle_everywhere(self) -> dict:
        """/api/stats and /metrics both say: nothing running or waiting, no KV block in use."""
        s = self.wait_idle()
        assert s["num_kv_blocks"] > 0
        m = self.metrics()
        assert metric(m, "miniinfer:num_requests_running") == 0
        assert metric(m, "miniinfer:num_requests_waiting") == 0
        assert metric(m, "miniinfer:num_free_kv_blocks") == metric(m, "miniinfer:num_kv_blocks") == s["num_kv_blocks"]
        assert metric(m, "miniinfer:kv_cache_usage_perc") == 0
        assert metric(m, "miniinfer:engine_healthy") == 1
        assert self.http.get("/health").status_code == 200
        return s

    # ------------------------------------------------------------------ the process
    def _status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def rss_kb(self) -> int:
        return self._status("VmRSS")

    def threads(self) -> int:
        return self._status("Threads")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process has used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def num_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        try:
            with open(self.srv.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_mark(self) -> int:
        """A position in the server log: later checks read only what follows it."""
        return len(self.log())

    def log_5xx(self, mark: int = 0) -> int:
        """5xx responses in the server's access log after ``mark`` (uvicorn logs one line per response)."""
        return len(re.findall(r'HTTP/1\.[01]" 5\d\d', self.log()[mark:]))

    def log_problems(self, mark: int = 0) -> list[str]:
        """Lines of the server log after ``mark`` that show an error: tracebacks, ERROR records."""
        return [line for line in self.log()[mark:].splitlines()
                if "Traceback" in line or "ERROR" in line or "CRITICAL" in line]


def metric(text: str, name: str, labels: str | None = None) -> float:
    """Sum of a Prometheus series' samples (those whose labels contain ``labels``, if given)."""
    vals = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if labels is None or labels in line.split(" ")[0]:
                vals.append(float(line.rsplit(" ", 1)[1]))
    if labels is None:
        assert vals, f"{name} not in /metrics"
    return sum(vals)


def http_5xx_metric(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("miniinfer:http_errors_total{") and 'status="5' in line)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def report(test: str, **figures) -> None:
    figures = {"test": test, "full": FULL, **figures}
    line = json.dumps(figures, sort_keys=False)
    print(f"\n[reliability] {line}", flush=True)
    if REPORT:
        os.makedirs(os.path.dirname(os.path.abspath(REPORT)), exist_ok=True)
        with open(REPORT, "a") as f:
            f.write(line + "\n")
