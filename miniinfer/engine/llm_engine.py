"""The engine core: requests in, one scheduled forward per ``step()``, outputs back.

    add_request ─▶ InputProcessor (template, tokenize, validate) ─▶ Scheduler.waiting
    step():  Scheduler.schedule ─▶ ModelRunner.launch (forward, then sample)
             ─▶ OutputProcessor (tokens, detokenize, stop checks) ─▶ RequestOutput (cumulative)
             (a constrained step may sample in the next step() instead: ``_step_deferred``)

Single-threaded; front ends (``LLM``, the HTTP server) drive it from one thread.
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from miniinfer.config import EngineConfig, ModelConfig
from miniinfer.engine.deferred_sampling import DeferredSampling
from miniinfer.engine.input_processor import InputLimits, InputProcessor
from miniinfer.errors import InvalidRequestError
from miniinfer.engine.kv_cache_manager import KVCacheManager
from miniinfer.engine.output_processor import OutputProcessor, Request
from miniinfer.engine.scheduler import Scheduler
from miniinfer.engine.sequence import Sequence
from miniinfer.engine.step import InFlightStep
from miniinfer.loader.model_loader import resolve_model
from miniinfer.outputs import RequestOutput
from miniinfer.parallel import TPGroup
from miniinfer.sampling_params import SamplingParams
from miniinfer.worker.model_runner import ModelRunner

log = logging.getLogger("miniinfer")


def forces_sync(params: SamplingParams) -> bool:
    """Whether a request needs every earlier token on the host before its next step is
    launched, which turns overlap scheduling off while it runs: penalties today (their count
    tensors are built on the host); speculative verify will join. (Grammars don't: their
    steps sample only after the previous step is processed, see ``_launch``.)"""
    return params.needs_penalties


class LLMEngine(DeferredSampling):
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        source = resolve_model(config)
        self.model_name = source.name
        self.model_config = ModelConfig.from_hf_dict(source.hf_config)
        tokenizer = None
        if source.tokenizer_path is not None:
            from miniinfer.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(source.tokenizer_path)
        limit = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({limit})")
        requested_len = config.max_model_len or limit
        eos = set(self.model_config.eos_token_ids)
        if tokenizer is not None:
            from miniinfer.tokenizer import eos_token_ids
            eos |= set(eos_token_ids(tokenizer, source.hf_config))
        self.tp_procs: list = []
        tp, channel = TPGroup(), None
        if config.tensor_parallel_size > 1 and config.distributed_executor_backend == "external_launcher":
            from miniinfer.worker.tp_worker import join_external
            tp, channel = join_external(config, self.model_config, source, requested_len)  # ranks > 0 stay there
        elif config.tensor_parallel_size > 1:
            from miniinfer.worker.tp_worker import start_workers
            tp, self.tp_procs, channel = start_workers(config, self.model_config, source, requested_len)
        if channel is not None:
            import atexit
            atexit.register(self.shutdown)
        try:
            self.runner = ModelRunner(config, self.model_config, source, requested_len, progress, tp)
        except BaseException:
            if self.tp_procs:  # the workers would wait on this rank's collectives forever
                from miniinfer.worker.tp_worker import kill_workers
                kill_workers(self.tp_procs)
            raise
        if channel is not None:
            procs = self.tp_procs
            self.runner.channel = channel
            if procs:
                self.runner.tp_alive = lambda: all(p.is_alive() for p in procs)
        layout = self.runner.kv_layout  # read once: nothing flows back to the runner
        self.max_model_len = layout.max_model_len
        self.kv = KVCacheManager(layout.num_blocks, layout.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.input_processor = InputProcessor(tokenizer, InputLimits(
            self.model_config.vocab_size, self.max_model_len, config.max_num_batched_tokens,
            config.enable_chunked_prefill, config.max_logprobs))
        self._structured = None  # StructuredOutputManager, built on the first constrained request
        self._structured_lock = threading.Lock()
        self.requests: dict[str, Request] = {}
        self.output_processor = OutputProcessor(tokenizer, eos, self.max_model_len, self.scheduler, self.requests,
                                                speculative=config.speculative_config is not None)
        self.eos_token_ids = eos
        self.inflight: InFlightStep | None = None  # launched, not yet processed (overlap)
        self._init_deferred_sampling(config)
        self._num_sync_requests = 0  # unfinished requests for which forces_sync() holds
        self.prompt_tokens_total = 0
        self.proposer = None  # speculative decoding's drafter (spec_decode/), None when off
        # overlap scheduling for steps launched here; with speculation only the drafter's own
        # steps run ahead (EAGLE's fused step: ``Proposer.run_ahead``), the others are synchronous
        self._overlap = config.overlap_scheduling and config.speculative_config is None
        if config.speculative_config is not None:
            from miniinfer.spec_decode import make_proposer
            self.proposer = make_proposer(config.speculative_config, self)
        log.info("KV cache: %d blocks x %d tokens = %d tokens", layout.num_blocks, layout.block_size,
                 layout.capacity_tokens)

    @property
    def tokenizer(self):
        return self.input_processor.tokenizer

    @property
    def eos_token_ids(self) -> set[int]:
        return self.output_processor.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: set[int]) -> None:
        self.output_processor.eos_token_ids = ids
        self.runner.eos_token_ids = sorted(ids)  # banned before min_tokens

    # --- requests -------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.input_processor.apply_chat_template(messages, add_generation_prompt)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.input_processor.tokenize(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    stream: bool = True, openai: bool = False, field: str = "prompt") -> list[int]:
        """Validate (``InputProcessor.process``) and queue ``params.n`` sequences; returns the
        prompt's token ids. Raises ``ValueError`` before anything is queued."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids, params = self.input_processor.process(prompt, params, field=field, openai=openai)
        grammar = self.compile_grammar(params) if params.structured_outputs is not None else None
        req = Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, stream)
        # All or nothing: every sequence is built before any is queued; if queuing still
        # fails, whatever was queued is released again.
        req.seqs = [self._new_sequence(request_id, i, ids, params, grammar) for i in range(params.n)]
        try:
            for seq in req.seqs:
                self.scheduler.add(seq)
        except BaseException:
            for seq in req.seqs:
                self.scheduler.finish(seq)
            raise
        self.requests[request_id] = req
        if forces_sync(params):
            self._num_sync_requests += 1
        self.prompt_tokens_total += len(ids)
        return ids

    @property
    def structured_output(self):
        """The engine's ``StructuredOutputManager`` (xgrammar), built on first use; the runner
        calls its ``fill_bitmask`` between forward and sampling."""
        with self._structured_lock:  # compile_grammar may be called from other threads
            return self._structured_output()

    def _structured_output(self):
        if self._structured is None:
            if self.tokenizer is None:
                raise InvalidRequestError("structured output needs a tokenizer", "structured_outputs")
            from miniinfer.structured_output import StructuredOutputManager
            self._structured = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size,
                                                       sorted(self.eos_token_ids), self.config.max_num_seqs,
                                                       self.runner.device)
            self._structured.overlap = self.config.structured_output_overlap
            self.runner.structured_output = self._structured
        return self._structured

    def compile_grammar(self, params: SamplingParams):
        """The compiled grammar of ``params.structured_outputs`` (cached; thread-safe, so a front
        end may call it before ``add_request`` off the engine thread). Raises
        ``InvalidRequestError`` naming the problem."""
        return self.structured_output.compile(params.structured_outputs)

    def _new_sequence(self, request_id: str, index: int, ids: list[int], params: SamplingParams,
                      grammar=None) -> Sequence:
        seq = Sequence(request_id, index, list(ids), len(ids), params)
        if grammar is not None:
            seq.grammar = self.structured_output.new_matcher(grammar)
            seq.reasoning_end = self._reasoning_end(ids)
        if params.seed is not None:
            # seed + index wraps into the generator's unsigned 64-bit range (seed is any int64)
            seq.generator = torch.Generator(device=self.runner.device).manual_seed((params.seed + index) % 2 ** 64)
        if params.logprobs is not None:
            seq.logprobs = []
        if self.tokenizer is not None:
            from miniinfer.detokenizer import IncrementalDetokenizer
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        if params.stop:
            from miniinfer.stop_checker import StopChecker
            seq.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
        return seq

    def _reasoning_end(self, prompt_ids: list[int]) -> list[int] | None:
        """The end marker's token ids when a grammar must wait for the thinking to end (a
        reasoning parser is set and the prompt did not already close the thinking), else None."""
        if self.config.reasoning_parser is None or self.tokenizer is None:
            return None
        from miniinfer.reasoning import reasoning_ended, reasoning_markers
        start, end = (self.tokenizer.encode(m, add_special_tokens=False)
                      for m in reasoning_markers(self.config.reasoning_parser))
        return None if reasoning_ended(prompt_ids, start, end) else end

    def _forget(self, req: Request) -> None:
        del self.requests[req.request_id]
        if forces_sync(req.params):
            self._num_sync_requests -= 1

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        self._forget(req)
        for seq in req.seqs:
            self.output_processor.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch step N, then process step N-1 while the device runs N.

        Overlap timeline (``overlap_scheduling=True``)::

            host:   schedule N │ launch N │ process N-1 (detok, stops) │ schedule N+1 ...
            device: ────── forward N-1 ──┼──────── forward N ────────────────┼─ ...

        Tokens sampled by step N-1 are not on the host when step N is prepared: they are
        placeholders in ``token_ids`` and the runner reads them from N-1's device tensor.
        Requests for which ``forces_sync`` holds run synchronously, and so do speculative
        steps, except EAGLE's fused step: the drafter queues step N + 1 itself before N is
        processed (``Proposer.run_ahead``, ``_step_ahead``).
        """
        if self._pending is not None:
            return self._step_deferred()
        if self.inflight is not None and self.proposer is not None and self._may_run_ahead(self.inflight):
            finish = self.proposer.run_ahead(self.inflight)
            if finish is not None:
                return self._step_ahead(finish)
        outputs: list[RequestOutput] = []
        if self.inflight is not None and (not self._overlap or self._num_sync_requests):
            outputs += self._complete(self.inflight)
            self.inflight = None
        if self.proposer is not None:
            self.proposer.propose_for(self.scheduler.running)
        sched = self.scheduler.schedule()
        fused = self.proposer is not None and self.proposer.claim(sched)  # the drafter runs it
        launched = None
        if not sched.is_empty() and self._defers(sched):
            self._start_deferred(sched)
            return outputs
        if not sched.is_empty():
            launched, done = self._launch(sched, fused)
            outputs += done
            self._launched(sched, launched.sampling_seqs)
        elif self.inflight is None and self.scheduler.waiting and not self.scheduler.running:
            self._fail_unschedulable()
        if self.inflight is not None:
            outputs += self._complete(self.inflight)
        self.inflight = launched
        if launched is not None and not self._overlap and not self._may_run_ahead(launched):
            outputs += self._complete(launched)
            self.inflight = None
        return outputs

    def _may_run_ahead(self, launched: InFlightStep) -> bool:
        """Whether a step stays in flight for the drafter to queue the next one behind it
        (``Proposer.run_ahead``): its own steps (``collect_with``) under overlap scheduling."""
        return self.config.overlap_scheduling and launched.collect_with is not None

    def _step_ahead(self, finish) -> list[RequestOutput]:
        """Speculation's overlap: the drafter has queued step N + 1 (``Proposer.run_ahead``)
        before step N (in flight) is processed; process N while the device runs N + 1, then
        let ``finish`` complete N + 1's launch from the processed state."""
        t0 = time.perf_counter()
        prev, self.inflight = self.inflight, None
        outputs = self._complete(prev)
        launched = finish()
        launched.launched_at = t0
        self._launched(launched.sched, launched.sampling_seqs)
        self.inflight = launched
        return outputs

    def _launched(self, sched, sampling_seqs) -> None:
        """Bookkeeping once a step's forward is queued: its sampling rows' tokens become
        placeholders, and its pages may be shared by later prompts at once."""
        for row, seq in enumerate(sampling_seqs):
            if not seq.is_finished:  # (finished by step N-1, processed before N sampled)
                seq.add_pending(row)
        if self.kv.enable_prefix_caching:
            for s in sched.scheduled:
                if not s.seq.is_finished:
                    self.scheduler.publish(s.seq)

    def _launch(self, sched, fused: bool = False) -> tuple[InFlightStep, list[RequestOutput]]:
        """Queue step N. If a constrained sequence samples in it while step N-1 is in flight,
        N's forward goes first, then N-1 is completed (its tokens advance the grammar matchers)
        and only then N is sampled, its bitmask filled while N's forward runs; otherwise
        forward and sample go together. Returns the launched step and N-1's outputs if it was
        completed here."""
        done: list[RequestOutput] = []
        grammar = self.inflight is not None and self._structured is not None and sched.has_constrained_sampler
        t0 = time.perf_counter() if self.proposer is not None else None  # a verify's time (spec metrics)
        try:
            if fused:  # the EAGLE step as one program (spec_decode/eagle_fused.py)
                launched = self.proposer.launch(sched)
            elif grammar:
                fwd = self.runner.forward(sched, self.inflight)
                prev, self.inflight = self.inflight, None
                result = self.runner.collect(prev)
                done = self._process(prev, result)  # matchers advance by N-1's tokens
                launched = self.runner.sample(fwd)  # N's mask is filled there, while N's forward runs
            else:
                launched = self.runner.launch(sched, self.inflight)
            launched.launched_at = t0
            return launched, done
        except BaseException:
            sched.rollback()
            raise

    def _complete(self, step: InFlightStep) -> list[RequestOutput]:
        return self._process(step, self.runner.collect(step))

    def _process(self, step: InFlightStep, result, grammar_job=None) -> list[RequestOutput]:
        if self.proposer is not None:  # a verify's time: its launch to its tokens on the host
            verify_s = time.perf_counter() - step.launched_at if step.launched_at is not None else None
            self.proposer.record(step.sched, result, verify_s)
        outputs = self.output_processor.process(step.sched, result, grammar_job)
        for out in outputs:
            if out.finished:
                self._forget(self.requests[out.request_id])
        return outputs

    def _fail_unschedulable(self) -> None:
        # Nothing runs and the head of the queue still can't get blocks: it can never fit.
        seq = self.scheduler.waiting[0]
        need = self.kv.blocks_needed(seq.num_tokens, 0)
        raise RuntimeError(f"request {seq.request_id} needs {need} KV blocks but the cache has "
                           f"{self.kv.num_blocks}: raise the KV-cache budget or lower max_model_len")

    # --- introspection ----------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.kv.usage(),
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.output_processor.generation_tokens_total,
            "prefix_cache_queries": self.kv.prefix_queries,
            "prefix_cache_hits": self.kv.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_deferred_steps": self.num_deferred_steps,
            **(self.proposer.stats() if self.proposer is not None else {}),
            "num_kv_blocks": self.kv.num_blocks,
            "num_free_kv_blocks": self.kv.num_free_blocks,
        }

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (idempotent; also runs at interpreter exit)."""
        if self.runner.channel is not None:
            from miniinfer.worker.tp_worker import stop_workers
            procs, self.tp_procs = self.tp_procs, []
            stop_workers(self.runner, procs)
            self.runner.channel = None

    def on_idle(self, raise_errors: bool = True) -> None:
        """Front ends call this when no request is left: drop a stale in-flight step and verify
        the KV bookkeeping: an O(1) leak check always, the full O(blocks) walk only for small
        caches (it costs ~50 ms per 100k blocks in Python)."""
        if self.requests:
            return
        self._pending = None  # a forward whose every sequence has finished: nothing to sample
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

