"""A tiny, deterministic stand-in for ``LLMEngine`` (same interface, no model).

Byte-level "tokenizer" (token id = UTF-8 byte, EOS = 256); each step emits one token
per running choice, taken from a fixed script (greedy) or a seeded RNG (sampling).

Injected faults (for the reliability tests):

* ``crash_after_steps=N``: a *persistent* device fault: step N+1 and every later step
  raise, ``check_integrity`` fails, and a new ``FakeEngine`` built in the same engine
  thread (the server's rebuild) fails too ("device lost"): the server ends up dead.
* ``fail_steps={k, ...}``: a *transient* fault: step k raises (before touching any state);
  aborting the requests and carrying on is a full recovery.
* ``corrupt_on_fault=True`` with ``fail_steps``: after the fault the fake's bookkeeping is
  broken (``check_integrity`` raises), so the server must rebuild the engine.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from miniinfer.outputs import CompletionOutput, Logprob, RequestOutput
from miniinfer.engine.input_processor import InputLimits, InputProcessor
from miniinfer.sampling_params import SamplingParams

EOS = 256
SCRIPT = "The quick brown fox jumps over the lazy dog. "
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "zeta"]


class FakeTokenizer:
    eos_token_id = EOS
    chat_template = "fake"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return 257


@dataclass
class _Choice:
    index: int
    text: str = ""  # full generated text
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    source: str = ""
    emitted: str = ""  # text visible to callers (held back while a stop string may be forming)


@dataclass
class _Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    choices: list[_Choice]
    arrival: float
    first_token: float | None = None
    finished_at: float | None = None

    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


class FakeEngine:
    def __init__(self, max_model_len: int = 512, num_kv_blocks: int = 256, block_size: int = 16,
                 max_num_seqs: int = 128, step_time: float = 0.0, eos_after: int = 400,
                 crash_after_steps: int | None = None, load_event: threading.Event | None = None,
                 fail_steps: set[int] | frozenset[int] = frozenset(), corrupt_on_fault: bool = False) -> None:
        if load_event is not None:
            load_event.wait(30)
        if getattr(threading.current_thread(), "_fake_device_lost", False):
            raise RuntimeError("simulated device lost: the engine cannot be rebuilt")
        self.fail_steps = set(fail_steps)
        self.corrupt_on_fault = corrupt_on_fault
        self.corrupted = False
        self.faults = 0
        self.integrity_checks = 0
        self.tokenizer = FakeTokenizer()
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.step_time = step_time
        self.eos_after = eos_after
        self.crash_after_steps = crash_after_steps
        self.steps = 0
        self.running: dict[str, _Req] = {}
        self.waiting: list[_Req] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.aborted: list[str] = []
        self._thread_ids: set[int] = set()

    # -- helpers
    def _touch(self) -> None:  # record which threads use the engine (must be exactly one)
        self._thread_ids.add(threading.get_ident())

    def _blocks(self, r: _Req) -> int:
        toks = len(r.prompt_ids) + max((len(c.token_ids) for c in r.choices), default=0)
        return -(-toks // self.block_size) * len(r.choices)

    def _used_blocks(self) -> int:
        return min(self.num_kv_blocks, sum(self._blocks(r) for r in self.running.values()))

    # -- interface
    def apply_chat_template(self, messages: list[dict]) -> str:
        self._touch()
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of dicts")
        parts = []
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}]['role'] must be one of system, user, assistant, tool")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]['content'] must be a string")
            parts.append(f"<{m['role']}>{m['content']}\n")
        return "".join(parts) + "<assistant>"

    def add_request(self, request_id: str, prompt, params: SamplingParams, openai: bool = False,
                    field: str = "prompt") -> list[int]:
        """The real engine's input processor over the fake tokenizer, then a scripted request."""
        self._touch()
        limits = InputLimits(len(self.tokenizer), self.max_model_len, 8192, True, 20)
        ids, params = InputProcessor(self.tokenizer, limits).process(prompt, params, field=field, openai=openai)
        if request_id in self.running or any(r.rid == request_id for r in self.waiting):
            raise ValueError(f"duplicate request id {request_id}")
        choices = []
        for i in range(params.n):
            if params.temperature == 0:
                src = SCRIPT * 40
            else:
                rng = random.Random(None if params.seed is None else params.seed * 1000 + i)
                src = " ".join(rng.choice(WORDS) for _ in range(400)) + " "
            choices.append(_Choice(index=i, source=src))
        self.waiting.append(_Req(request_id, ids, params, choices, time.monotonic()))
        return ids

    def abort_request(self, request_id: str) -> None:
        self._touch()
        self.aborted.append(request_id)
        self.running.pop(request_id, None)
        self.waiting = [r for r in self.waiting if r.rid != request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[RequestOutput]:
        self._touch()
        self.steps += 1
        if self.crash_after_steps is not None and self.steps > self.crash_after_steps:
            self.faults += 1
            self.corrupted = True
            threading.current_thread()._fake_device_lost = True  # type: ignore[attr-defined]
            raise RuntimeError("simulated engine crash")
        if self.steps in self.fail_steps:
            self.faults += 1
            self.corrupted = self.corrupt_on_fault
            raise RuntimeError(f"simulated transient fault at step {self.steps}")
        if self.step_time:
            time.sleep(self.step_time)
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting.pop(0)
            self.running[r.rid] = r
            self.prompt_tokens_total += len(r.prompt_ids)
        outs = []
        now = time.monotonic()
        for r in list(self.running.values()):
            p = r.params
            for c in r.choices:
                if c.finish_reason:
                    continue
                k = len(c.token_ids)
                if not p.ignore_eos and k >= max(self.eos_after, p.min_tokens):
                    c.finish_reason, c.stop_reason = "stop", None
                    c.emitted = c.text
                    continue
                tid = c.source.encode("utf-8")[k % len(c.source)]
                c.token_ids.append(tid)
                self.generation_tokens_total += 1
                c.text = self.tokenizer.decode(c.token_ids)
                if p.logprobs is not None:
                    d = {tid: Logprob(-0.25, 1, chr(tid))}
                    alt = [t for t in range(97, 123) if t != tid]
                    for j in range(p.logprobs):
                        d.setdefault(alt[j], Logprob(-2.0 - j, j + 2, chr(alt[j])))
                    c.logprobs.append(d)
                done_stop = next((s for s in p.stop if s in c.text), None)
                if done_stop is not None:
                    cut = c.text.index(done_stop) + (len(done_stop) if p.include_stop_str_in_output else 0)
                    c.text = c.text[:cut]
                    c.finish_reason, c.stop_reason = "stop", done_stop
                    c.emitted = c.text
                elif p.max_tokens is not None and len(c.token_ids) >= p.max_tokens:
                    c.finish_reason = "length"
                    c.emitted = c.text
                elif len(r.prompt_ids) + len(c.token_ids) >= self.max_model_len:
                    c.finish_reason = "length"
                    c.emitted = c.text
                else:
                    hold = max((len(s) for s in p.stop), default=1) - 1
                    c.emitted = c.text[:len(c.text) - hold] if hold else c.text
            if r.first_token is None:
                r.first_token = now
            fin = r.finished()
            if fin:
                r.finished_at = now
                del self.running[r.rid]
            outs.append(RequestOutput(
                request_id=r.rid, prompt=None, prompt_token_ids=r.prompt_ids,
                outputs=[CompletionOutput(index=c.index, text=c.emitted, token_ids=c.token_ids,
                                          finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                          logprobs=c.logprobs if p.logprobs is not None else None)
                         for c in r.choices],
                finished=fin,
                metrics={"arrival_time": r.arrival, "first_token_time": r.first_token,
                         "finished_time": r.finished_at,
                         "num_generated_tokens": sum(len(c.token_ids) for c in r.choices)}))
        return outs

    def check_integrity(self) -> None:
        self._touch()
        self.integrity_checks += 1
        if self.corrupted:
            raise AssertionError("simulated broken KV bookkeeping after a fault")

    def on_idle(self, raise_errors: bool = True) -> None:
        if self.running or self.waiting:
            return
        try:
            self.check_integrity()
        except AssertionError:
            if raise_errors:
                raise

    def stats(self) -> dict:
        used = self._used_blocks()
        return {
            "num_running": len(self.running), "num_waiting": len(self.waiting),
            "kv_cache_usage": used / self.num_kv_blocks,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "prefix_cache_queries": self.prompt_tokens_total, "prefix_cache_hits": 0,
            "num_preemptions": 0, "num_kv_blocks": self.num_kv_blocks,
            "num_free_kv_blocks": self.num_kv_blocks - used,
        }
