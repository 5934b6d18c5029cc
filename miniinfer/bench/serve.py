"""``miniinfer bench serve``: load-test a running MiniInfer (or any OpenAI-compatible) server.

Random prompts are sent as token ids to ``/v1/completions`` (exact input lengths), with
``ignore_eos`` and ``max_tokens`` set so every request generates exactly its output
length. Requests arrive as a Poisson process at each rate (``inf``: all at once) and
stream their tokens back; per rate we report TTFT, TPOT, ITL and end-to-end latency
percentiles, request / token throughput and goodput (requests meeting the TTFT and
TPOT targets per second). Results: a JSON file ``{"device", "date", "command",
"metrics"}`` and a PNG plot of latency and throughput against the request rate.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# --------------------------------------------------------------------------- helpers

def _pair(text: str, name: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"{name} must be 'MIN,MAX' (integers), got {text!r}") from None
    if lo < 1 or hi < lo:
        raise SystemExit(f"{name} must satisfy 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _rates(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("inf", "infinity"):
            out.append(math.inf)
            continue
        try:
            r = float(part)
        except ValueError:
            raise SystemExit(f"--request-rates: not a number: {part!r}") from None
        if r <= 0:
            raise SystemExit(f"--request-rates must be > 0 (or inf), got {part}")
        out.append(r)
    return out


def rate_label(rate: float) -> str:
    if math.isinf(rate):
        return "inf"
    return str(int(rate)) if float(rate).is_integer() else str(rate).replace(".", "p")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _redact(argv: list[str]) -> list[str]:
    """Hide the API key in the recorded command line."""
    out, hide = [], False
    for x in argv:
        if hide:
            out.append("REDACTED")
            hide = False
        elif x == "--api-key":
            out.append(x)
            hide = True
        elif x.startswith("--api-key="):
            out.append("--api-key=REDACTED")
        else:
            out.append(x)
    return out


def _local_device() -> str:
    return f"client {platform.node() or 'host'} ({os.cpu_count()} cores, {platform.machine()})"


def build_workload(num: int, in_range: tuple[int, int], out_range: tuple[int, int], seed: int,
                   vocab: tuple[int, int], max_model_len: int | None) -> list[tuple[list[int], int]]:
    """``num`` (prompt token ids, output length) pairs; prompt + output fit the context."""
    rng = random.Random(seed)
    work = []
    for _ in range(num):
        n_in = rng.randint(*in_range)
        n_out = rng.randint(*out_range)
        if max_model_len:
            n_in = min(n_in, max_model_len - 2)
            n_out = max(1, min(n_out, max_model_len - n_in))
        work.append(([rng.randrange(vocab[0], vocab[1]) for _ in range(n_in)], n_out))
    return work


# --------------------------------------------------------------------------- the load

async def _one(client: httpx.AsyncClient, url: str, payload: dict, headers: dict) -> RequestResult:
    res = RequestResult(prompt_len=len(payload["prompt"]))
    t0 = time.perf_counter()
    last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {body[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message", obj["error"]))
                    return res
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                choices = obj.get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - t0
    res.output_tokens = usage_tokens if usage_tokens is not None else chunks
    if last is None:  # nothing streamed (e.g. all text empty): first token == end
        res.ttft = res.latency
    res.ok = True
    return res


async def run_rate(base_url: str, model: str, work: list[tuple[list[int], int]], rate: float, seed: int,
                   headers: dict, max_concurrency: int | None, timeout: float,
                   progress: bool = True) -> tuple[list[RequestResult], float]:
    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed)
    limit = max_concurrency or len(work)
    sem = asyncio.Semaphore(limit)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(work), desc=f"rate {rate_label(rate)} req/s", unit="req", leave=True)
        except ImportError:
            bar = None
    limits = httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        async def fire(prompt: list[int], n_out: int) -> RequestResult:
            payload = {"model": model, "prompt": prompt, "max_tokens": n_out, "temperature": 0.0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with sem:
                res = await _one(client, url, payload, headers)
            if bar is not None:
                bar.update(1)
            return res

        tasks = []
        t_start = time.perf_counter()
        for prompt, n_out in work:
            tasks.append(asyncio.ensure_future(fire(prompt, n_out)))
            if not math.isinf(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_start
    if bar is not None:
        bar.close()
    return list(results), duration


def summarize(results: list[RequestResult], duration: float, prefix: str, ttft_slo_ms: float,
              tpot_slo_ms: float) -> dict:
    ok = [r for r in results if r.ok]
    m: dict[str, float] = {}
    m[f"{prefix}_completed"] = len(ok)
    m[f"{prefix}_failed"] = len(results) - len(ok)
    m[f"{prefix}_duration_s"] = duration
    in_tok = sum(r.prompt_len for r in ok)
    out_tok = sum(r.output_tokens for r in ok)
    m[f"{prefix}_request_throughput_req_s"] = len(ok) / duration if duration else 0.0
    m[f"{prefix}_input_throughput_tok_s"] = in_tok / duration if duration else 0.0
    m[f"{prefix}_output_throughput_tok_s"] = out_tok / duration if duration else 0.0
    m[f"{prefix}_total_throughput_tok_s"] = (in_tok + out_tok) / duration if duration else 0.0
    series = {
        "ttft": [r.ttft * 1000 for r in ok],
        "tpot": [r.tpot * 1000 for r in ok if r.tpot is not None],
        "itl": [x * 1000 for r in ok for x in r.itl],
        "e2e_latency": [r.latency * 1000 for r in ok],
    }
    for name, vals in series.items():
        m[f"{prefix}_{name}_mean_ms"] = _mean(vals)
        for q in (50, 90, 99):
            m[f"{prefix}_{name}_p{q}_ms"] = _pct(vals, q)
    good = [r for r in ok if r.ttft * 1000 <= ttft_slo_ms and (r.tpot is None or r.tpot * 1000 <= tpot_slo_ms)]
    m[f"{prefix}_goodput_req_s"] = len(good) / duration if duration else 0.0
    return m


# --------------------------------------------------------------------------- output

def plot(metrics: dict, rates: list[float], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [rate_label(r) for r in rates]
    x = list(range(len(rates)))

    def get(rate_labels: list[str], key: str) -> list[float]:
        return [metrics.get(f"serve_rate{lab}_{key}", float("nan")) for lab in rate_labels]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, name in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(x, get(labels, f"{metric}_{q}_ms"), style, label=q)
        ax.set_title(name)
        ax.set_ylabel("ms")
        ax.legend()
    ax = axes[2]
    ax.plot(x, get(labels, "output_throughput_tok_s"), "o-", label="output tok/s")
    ax.set_ylabel("tokens/s")
    ax.set_title("Throughput and goodput")
    ax2 = ax.twinx()
    ax2.plot(x, get(labels, "request_throughput_req_s"), "s--", color="tab:orange", label="requests/s")
    ax2.plot(x, get(labels, "goodput_req_s"), "^:", color="tab:green", label="goodput req/s")
    ax2.set_ylabel("requests/s")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="best")
    for a in axes:
        a.set_xticks(x, labels)
        a.set_xlabel("request rate (req/s)")
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_table(metrics: dict, rates: list[float]) -> None:
    cols = [("req/s", "request_throughput_req_s"), ("out tok/s", "output_throughput_tok_s"),
            ("TTFT p50", "ttft_p50_ms"), ("TTFT p99", "ttft_p99_ms"), ("TPOT p50", "tpot_p50_ms"),
            ("TPOT p99", "tpot_p99_ms"), ("ITL p50", "itl_p50_ms"), ("goodput", "goodput_req_s"),
            ("failed", "failed")]
    head = f"{'rate':>6} " + " ".join(f"{c[0]:>10}" for c in cols)
    print(head, file=sys.stderr)
    for r in rates:
        lab = rate_label(r)
        vals = [metrics.get(f"serve_rate{lab}_{k}", float("nan")) for _, k in cols]
        print(f"{lab:>6} " + " ".join(f"{v:>10.1f}" for v in vals), file=sys.stderr)


# --------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miniinfer bench serve",
                                description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: %(default)s)")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $MINIINFER_API_KEY)")
    p.add_argument("--num-requests", type=int, default=200, help="requests per rate (default: %(default)s)")
    p.add_argument("--request-rates", default="4,16,64,inf",
                   help="comma-separated Poisson arrival rates in req/s; inf = all at once")
    p.add_argument("--input-len-range", default="100,1024", help="MIN,MAX prompt tokens (uniform)")
    p.add_argument("--output-len-range", default="100,512", help="MIN,MAX generated tokens (uniform)")
    p.add_argument("--vocab-range", default="100,10000", help="MIN,MAX token id for random prompts")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on in-flight requests")
    p.add_argument("--goodput-ttft-ms", type=float, default=500.0)
    p.add_argument("--goodput-tpot-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="per-request timeout in seconds")
    p.add_argument("--warmup", type=int, default=2, help="short requests sent before measuring")
    p.add_argument("--json", default=None, metavar="PATH", help="write the result JSON here")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG plot here")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    if a.num_requests < 1:
        raise SystemExit("--num-requests must be >= 1")
    rates = _rates(a.request_rates)
    in_range = _pair(a.input_len_range, "--input-len-range")
    out_range = _pair(a.output_len_range, "--output-len-range")
    vocab = _pair(a.vocab_range, "--vocab-range")
    api_key = a.api_key or os.environ.get("MINIINFER_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = a.base_url.rstrip("/")

    try:
        health = httpx.get(base + "/health", timeout=30)
        models = httpx.get(base + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        print(f"cannot reach the server at {base}: {e}", file=sys.stderr)
        return 1
    if health.status_code != 200 or models.status_code != 200:
        print(f"server at {base} is not ready: /health {health.status_code}, /v1/models {models.status_code} "
              f"{models.text[:200]}", file=sys.stderr)
        return 1
    card = models.json()["data"][0]
    model = a.model or card["id"]
    max_model_len = card.get("max_model_len")
    device = None
    try:
        device = httpx.get(base + "/version", timeout=10).json().get("device")
    except (httpx.HTTPError, ValueError):
        pass

    work = build_workload(a.num_requests, in_range, out_range, a.seed, vocab, max_model_len)
    if a.warmup:
        warm = build_workload(a.warmup, (16, 32), (4, 8), a.seed + 1, vocab, max_model_len)
        asyncio.run(run_rate(base, model, warm, math.inf, a.seed, headers, None, a.timeout, progress=False))

    metrics: dict[str, float] = {
        "serve_num_requests": a.num_requests,
        "serve_input_len_mean": _mean([len(p) for p, _ in work]),
        "serve_output_len_mean": _mean([n for _, n in work]),
    }
    errors: list[str] = []
    for i, rate in enumerate(rates):
        results, duration = asyncio.run(run_rate(base, model, work, rate, a.seed + 1000 * (i + 1), headers,
                                                 a.max_concurrency, a.timeout, progress=not a.no_progress))
        metrics.update(summarize(results, duration, f"serve_rate{rate_label(rate)}",
                                 a.goodput_ttft_ms, a.goodput_tpot_ms))
        errors += [r.error for r in results if not r.ok][:3]
    _print_table(metrics, rates)
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)

    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    result = {
        "device": device or _local_device(),
        "date": datetime.date.today().isoformat(),
        "command": "miniinfer bench serve " + " ".join(shlex.quote(x) for x in _redact(argv)),
        "metrics": clean,
    }
    print(json.dumps(result, indent=2))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    if a.plot:
        plot(metrics, rates, a.plot, f"MiniInfer serving: {model} on {result['device']} "
                                     f"({a.num_requests} requests per rate)")
    return 0 if not errors else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
