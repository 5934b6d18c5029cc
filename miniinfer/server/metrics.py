"""Prometheus metrics (own registry) and the numbers behind the dashboard's /api/stats."""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

try:  # no "<name>_created" series: they only add noise to a single-process server
    from prometheus_client import disable_created_metrics
    disable_created_metrics()
except ImportError:  # pragma: no cover - older prometheus_client
    pass
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from miniinfer.outputs import RequestOutput

if TYPE_CHECKING:
    from miniinfer.server.async_engine import AsyncEngine

PREFIX = "miniinfer:"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    """Reads the engine-thread stats snapshot at scrape time."""

    def __init__(self, engine: "AsyncEngine", model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        s = self.engine.stats()
        labels = ["model_name"]
        name = self.engine.model_name or self.model_name

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + metric, doc, labels=labels)
            g.add_metric([name], float(value))
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + metric, doc, labels=labels)
            c.add_metric([name], float(value))
            return c

        yield gauge("num_requests_running", "Requests currently in the running batch.", s["num_running"])
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s["num_waiting"])
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", s["kv_cache_usage"])
        yield gauge("num_kv_blocks", "Total KV-cache blocks.", s["num_kv_blocks"])
        yield gauge("num_free_kv_blocks", "Free KV-cache blocks.", s["num_free_kv_blocks"])
        yield gauge("engine_healthy", "1 when the engine thread is alive and the model loaded.",
                    1.0 if self.engine.healthy else 0.0)
        yield counter("prompt_tokens", "Prompt tokens processed.", s["prompt_tokens_total"])
        yield counter("generation_tokens", "Tokens generated.", s["generation_tokens_total"])
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s["prefix_cache_queries"])
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_cache_hits"])
        yield counter("num_preemptions", "Requests preempted for lack of KV-cache space.", s["num_preemptions"])
        yield counter("deferred_sampling_steps", "Constrained steps whose sampling was deferred until the next "
                      "step was staged (grammar mask filled on a thread meanwhile).", s.get("num_deferred_steps", 0))
        if "spec_num_drafts" in s:  # speculative decoding (vLLM's metric names)
            yield counter("spec_decode_num_drafts", "Verify steps x sequences that carried drafts.",
                          s["spec_num_drafts"])
            yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed.", s["spec_num_draft_tokens"])
            yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", s["spec_num_accepted_tokens"])
            yield counter("spec_decode_draft_time_seconds", "Wall time of the drafting steps.", s["spec_draft_time_s"])
            yield counter("spec_decode_verify_time_seconds", "Wall time of the verify steps (launch to committed tokens).",
                          s["spec_verify_time_s"])


class ServerMetrics:
    """Latency histograms and error counters (Prometheus) plus the dashboard's recent-request window."""

    def __init__(self, engine: "AsyncEngine", model_name: str = "miniinfer", window_s: float = 3.0) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(engine, model_name))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.requests = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                ["finished_reason"], registry=self.registry)
        self.http_errors = Counter(PREFIX + "http_errors", "Error responses by status code.",
                                   ["status"], registry=self.registry)
        self.window_s = window_s
        self._recent: deque[tuple[float, float | None, float | None, float]] = deque(maxlen=512)
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=600)
        self._t0 = time.monotonic()

    # called on the event loop when a request finishes
    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics or {}
        arrival, first, done = m.get("arrival_time"), m.get("first_token_time"), m.get("finished_time")
        ntok = m.get("num_generated_tokens")
        if ntok is None:
            ntok = sum(len(c.token_ids) for c in out.outputs)
        n_choices = max(1, len(out.outputs))
        ttft = tpot = None
        if arrival is not None and first is not None:
            ttft = max(0.0, first - arrival)
            self.ttft.observe(ttft)
        if first is not None and done is not None:
            per_choice = ntok / n_choices
            if per_choice > 1:
                tpot = max(0.0, done - first) / (per_choice - 1)
                self.tpot.observe(tpot)
        e2e = None
        if arrival is not None and done is not None:
            e2e = max(0.0, done - arrival)
            self.e2e.observe(e2e)
        for c in out.outputs:
            self.requests.labels(finished_reason=c.finish_reason or "unknown").inc()
        self._recent.append((time.monotonic(), ttft, tpot, e2e if e2e is not None else 0.0))

    def sample(self) -> None:
        """Record a (time, generation tokens, prompt tokens) sample for throughput."""
        s = self.engine.stats()
        self._samples.append((time.monotonic(), float(s["generation_tokens_total"]),
                              float(s["prompt_tokens_total"])))

    def _throughput(self, now: float) -> tuple[float, float]:
        """Token rates over the last ``window_s`` seconds of samples."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        latest = self._samples[-1]
        old = self._samples[0]
        for smp in self._samples:  # the newest sample at least window_s older than `latest`
            if smp[0] <= latest[0] - self.window_s:
                old = smp
            else:
                break
        dt = latest[0] - old[0]
        if dt <= 0:
            return 0.0, 0.0
        return (latest[1] - old[1]) / dt, (latest[2] - old[2]) / dt

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def dashboard(self) -> dict:
        now = time.monotonic()
        s = self.engine.stats()
        gen_tps, prompt_tps = self._throughput(now)
        recent = [r for r in self._recent if now - r[0] <= 30.0]
        ttfts = [r[1] for r in recent if r[1] is not None]
        tpots = [r[2] for r in recent if r[2] is not None]
        total = s.get("num_kv_blocks") or 0
        q, h = s.get("prefix_cache_queries") or 0, s.get("prefix_cache_hits") or 0
        return {
            "time": time.time(),
            "uptime_s": now - self._t0,
            "state": self.engine.state,
            "healthy": self.engine.healthy,
            "error": self.engine.error,
            "model": self.engine.model_name,
            "max_model_len": self.engine.max_model_len,
            "num_requests_running": s["num_running"],
            "num_requests_waiting": s["num_waiting"],
            "kv_cache_usage_perc": s["kv_cache_usage"],
            "num_kv_blocks": total,
            "num_free_kv_blocks": s.get("num_free_kv_blocks", 0),
            "prompt_tokens_total": s["prompt_tokens_total"],
            "generation_tokens_total": s["generation_tokens_total"],
            "prefix_cache_queries_total": q,
            "prefix_cache_hits_total": h,
            "prefix_cache_hit_rate": (h / q) if q else 0.0,
            "num_preemptions_total": s["num_preemptions"],
            "num_deferred_steps_total": s.get("num_deferred_steps", 0),
            "spec_acceptance_rate": s.get("spec_acceptance_rate"),  # None without speculation
            "spec_mean_accepted_len": s.get("spec_mean_accepted_len"),
            "spec_draft_ms_per_step": s.get("spec_draft_ms_per_step"),
            "spec_verify_ms_per_step": s.get("spec_verify_ms_per_step"),
            "generation_throughput_tok_s": gen_tps,
            "prompt_throughput_tok_s": prompt_tps,
            "recent_requests": len(recent),
            "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
            "tpot_mean_s": sum(tpots) / len(tpots) if tpots else None,
        }
