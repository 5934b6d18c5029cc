"""The engine core: requests in, one scheduled forward per ``step()``, outputs back.

    add_request ─▶ tokenize + validate ─▶ Scheduler.waiting
    step():  Scheduler.schedule ─▶ ModelRunner.execute (forward + sample)
             ─▶ append tokens ─▶ detokenize ─▶ stop checks ─▶ RequestOutput (cumulative)

Single-threaded; front ends (``LLM``, the HTTP server) drive it from one thread.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from miniinfer.config import EngineConfig, ModelConfig
from miniinfer.engine.kv_cache_manager import KVCacheManager
from miniinfer.engine.model_runner import InFlightStep, ModelRunner, StepResult
from miniinfer.engine.scheduler import Scheduler, SchedulerOutput
from miniinfer.engine.sequence import Sequence, SequenceStatus
from miniinfer.loader.model_loader import resolve_model
from miniinfer.outputs import CompletionOutput, Logprob, RequestOutput
from miniinfer.parallel import TPGroup
from miniinfer.sampling_params import SamplingParams

log = logging.getLogger("miniinfer")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = True  # False: step() reports the request only once it has finished
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        source = resolve_model(config)
        self.model_name = source.name
        self.model_config = ModelConfig.from_hf_dict(source.hf_config)
        self.tokenizer = None
        if source.tokenizer_path is not None:
            from miniinfer.tokenizer import load_tokenizer
            self.tokenizer = load_tokenizer(source.tokenizer_path)
        limit = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({limit})")
        self.max_model_len = config.max_model_len or limit
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            from miniinfer.tokenizer import eos_token_ids
            self.eos_token_ids |= set(eos_token_ids(self.tokenizer, source.hf_config))
        self.tp_procs: list = []
        tp = TPGroup()
        if config.tensor_parallel_size > 1:
            from miniinfer.engine.tp_workers import start_workers
            tp, self.tp_procs = start_workers(config, self.model_config, source, self.max_model_len)
            import atexit
            atexit.register(self.shutdown)
        self.runner = ModelRunner(config, self.model_config, source, self.max_model_len, progress, tp)
        self.runner.eos_token_ids = sorted(self.eos_token_ids)  # banned before min_tokens
        capacity = self.runner.num_blocks * config.block_size
        if self.max_model_len > capacity:
            log.warning("max_model_len lowered from %d to %d: the KV cache holds no more",
                        self.max_model_len, capacity)
            self.max_model_len = capacity
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.inflight: InFlightStep | None = None  # launched, not yet processed (overlap)
        self._num_sync_requests = 0  # unfinished requests that disable overlap (penalties)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        torch.manual_seed(config.seed)
        log.info("KV cache: %d blocks x %d tokens = %d tokens", self.runner.num_blocks, config.block_size,
                 self.runner.num_blocks * config.block_size)

    # --- requests -------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None:
            raise ValueError("model has no tokenizer: chat needs one")
        from miniinfer.tokenizer import apply_chat_template
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: model has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    stream: bool = True) -> None:
        params = params or SamplingParams()
        params.validate()  # fields may have been changed since construction
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt must not be empty")
        ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens long, but max_model_len is {self.max_model_len} "
                             f"(the prompt must leave room for at least one generated token)")
        if not self.config.enable_chunked_prefill and len(ids) > self.config.max_num_batched_tokens:
            raise ValueError(f"prompt is {len(ids)} tokens long, but max_num_batched_tokens is "
                             f"{self.config.max_num_batched_tokens} and chunked prefill is disabled")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs must be <= {self.config.max_logprobs}, got {params.logprobs}")
        req = Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, stream)
        for i in range(params.n):
            seq = Sequence(request_id, i, list(ids), len(ids), params)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            if params.logprobs is not None:
                seq.logprobs = []
            if self.tokenizer is not None:
                from miniinfer.detokenizer import IncrementalDetokenizer
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            if params.stop:
                from miniinfer.stop_checker import StopChecker
                seq.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        if params.needs_penalties:
            self._num_sync_requests += 1
        self.prompt_tokens_total += len(ids)

    def _forget(self, req: Request) -> None:
        del self.requests[req.request_id]
        if req.params.needs_penalties:
            self._num_sync_requests -= 1

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        self._forget(req)
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch step N, then process step N-1 while the device runs N.

        Overlap timeline (``overlap_scheduling=True``)::

            host:   schedule N │ prepare+launch N │ process N-1 (detok, stops) │ schedule N+1 ...
            device: ────── forward N-1 ──────────┼──────── forward N ────────────────┼─ ...

        Tokens sampled by step N-1 are not on the host when step N is prepared: they are
        placeholders in ``token_ids`` and the runner reads them from N-1's device tensor.
        Requests that need every token on the host before sampling (penalties) run synchronously.
        """
        outputs: list[RequestOutput] = []
        if self.inflight is not None and (not self.config.overlap_scheduling or self._num_sync_requests):
            outputs += self._complete(self.inflight)
            self.inflight = None
        sched = self.scheduler.schedule()
        launched = None
        if not sched.is_empty():
            try:
                launched = self.runner.launch(sched, self.inflight)
            except BaseException:
                # The step's K/V may not have been written: roll the progress back so that an
                # abort (which publishes computed pages) can't put unwritten pages in the cache.
                for s in sched.scheduled:
                    s.seq.num_computed_tokens = s.start
                raise
            for row, seq in enumerate(launched.sampling_seqs):
                seq.add_pending(row)
            if self.kv.enable_prefix_caching:
                for s in sched.scheduled:  # later steps may reuse these pages at once
                    self.scheduler.publish(s.seq)
        elif self.inflight is None and self.scheduler.waiting and not self.scheduler.running:
            self._fail_unschedulable()
        if self.inflight is not None:
            outputs += self._complete(self.inflight)
        self.inflight = launched
        if launched is not None and not self.config.overlap_scheduling:
            outputs += self._complete(launched)
            self.inflight = None
        return outputs

    def _complete(self, step: InFlightStep) -> list[RequestOutput]:
        return self._process(step.sched, self.runner.collect(step))

    def _fail_unschedulable(self) -> None:
        # Nothing runs and the head of the queue still can't get blocks: it can never fit.
        seq = self.scheduler.waiting[0]
        need = self.kv.blocks_needed(seq.num_tokens, 0)
        raise RuntimeError(f"request {seq.request_id} needs {need} KV blocks but the cache has "
                           f"{self.kv.num_blocks}: raise the KV-cache budget or lower max_model_len")

    def _process(self, sched: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        now = time.monotonic()
        touched: set[str] = set()
        sample_i = 0
        for s in sched.scheduled:
            seq = s.seq
            touched.add(seq.request_id)
            if not s.samples:
                if not seq.is_finished:
                    self.scheduler.publish(seq)
                continue
            token = result.token_ids[sample_i]
            row = sample_i
            sample_i += 1
            if seq.is_finished:  # stopped or aborted while this step ran: drop the token
                continue
            if seq.logprobs is not None:
                seq.logprobs.append(self._logprob_entry(result, row, token, seq.params.logprobs))
            seq.resolve_pending(token)
            self.generation_tokens_total += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            self._check_stop(seq, token)
            if seq.is_finished:
                seq.finished_time = now
            else:
                self.scheduler.publish(seq)
        return self._collect(touched)

    def _logprob_entry(self, result: StepResult, row: int, token: int, top_n: int) -> dict[int, Logprob]:
        out = result.sampler_output
        entry: dict[int, Logprob] = {}
        decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else (lambda t: None)
        ids = out.top_ids[row, :top_n].tolist()
        vals = out.top_logprobs[row, :top_n].tolist()
        for rank, (t, v) in enumerate(zip(ids, vals), start=1):
            entry[t] = Logprob(v, rank, decode(t))
        if token not in entry:
            entry[token] = Logprob(float(out.sampled_logprob[row]), int(out.sampled_rank[row]), decode(token))
        return entry

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        new_text = ""
        if seq.detokenizer is not None:
            new_text = seq.detokenizer.push([token])
        text = seq.detokenizer.text if seq.detokenizer is not None else ""
        n_out = seq.num_output_tokens
        reason = stop = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason, stop = "stop", None
            elif token in p.stop_token_ids:
                reason, stop = "stop", token
        if reason is None and seq.stop_checker is not None and new_text:
            matched, cut = seq.stop_checker.check(text, len(new_text))
            if matched is not None:
                reason, stop = "stop", matched
                seq.output_text = text[:cut]
        if reason is None and p.max_tokens is not None and n_out >= p.max_tokens:
            reason = "length"
        if reason is None and seq.num_tokens - seq.num_pending >= self.max_model_len:
            reason = "length"
        if reason is None:
            if seq.stop_checker is not None:
                seq.output_text = text[:seq.stop_checker.streamable_len(text)]
            else:
                seq.output_text = text
            return
        if not (stop is not None and isinstance(stop, str)) and seq.detokenizer is not None:
            seq.detokenizer.finish()
            seq.output_text = seq.detokenizer.text
        seq.finish_reason, seq.stop_reason = reason, stop
        self.scheduler.finish(seq)

    def _collect(self, touched: set[str]) -> list[RequestOutput]:
        outputs = []
        for rid in touched:
            req = self.requests.get(rid)
            if req is None:
                continue
            finished = req.finished
            if finished or req.stream:
                outputs.append(self._make_output(req))
            if finished:
                self._forget(req)
        return outputs

    def _make_output(self, req: Request) -> RequestOutput:
        seqs = req.seqs
        comps = [CompletionOutput(s.index, s.output_text, s.output_token_ids, s.finish_reason, s.stop_reason,
                                  s.logprobs) for s in seqs]
        first = [s.first_token_time for s in seqs if s.first_token_time is not None]
        done = [s.finished_time for s in seqs if s.finished_time is not None]
        metrics = {
            "arrival_time": seqs[0].arrival_time,
            "first_token_time": min(first) if first else None,
            "finished_time": max(done) if req.finished and done else None,
            "num_generated_tokens": sum(s.num_output_tokens for s in seqs),
        }
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, comps, req.finished,
                             num_cached_tokens=seqs[0].num_cached_tokens, metrics=metrics)

    # --- introspection ----------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.kv.usage(),
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "prefix_cache_queries": self.kv.prefix_queries,
            "prefix_cache_hits": self.kv.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_kv_blocks": self.kv.num_blocks,
            "num_free_kv_blocks": self.kv.num_free_blocks,
        }

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (idempotent; also runs at interpreter exit)."""
        if self.tp_procs:
            from miniinfer.engine.tp_workers import stop_workers
            procs, self.tp_procs = self.tp_procs, []
            stop_workers(self.runner, procs)

    def on_idle(self, raise_errors: bool = True) -> None:
        """Front ends call this when no request is left: drop a stale in-flight step and verify
        the KV bookkeeping: an O(1) leak check always, the full O(blocks) walk only for small
        caches (it costs ~50 ms per 100k blocks in Python)."""
        if self.requests:
            return
        if self.inflight is not None:
            self._complete(self.inflight)
            self.inflight = None
        if not self.config.check_integrity_when_idle:
            return
        try:
            self.kv.check_idle()
            if self.kv.num_blocks <= 8192:  # the full walk is O(blocks): only for small caches
                self.check_integrity()
        except AssertionError:
            log.exception("KV-cache integrity check failed")
            if raise_errors:
                raise
