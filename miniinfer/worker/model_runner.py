"""The model runner: a scheduled step in, device work queued, sampled ids back.

Owns the model, the KV-cache tensors and the CUDA graphs. Per step the engine calls
``forward`` (pack inputs, fill placeholders, run the model: a graph or eager) and then
``sample`` (sampling metadata, the sampler, a non-blocking copy of the ids to pinned host
memory); ``launch`` is the two in a row. Between them the host may work on the previous step
(and, with structured output, fill the grammar bitmask that ``sample`` applies).
``collect`` waits for a launched step's ids: a step's only device-to-host synchronization.
"""
from __future__ import annotations

import logging
import random

import torch

from miniinfer.attention import get_backend
from miniinfer.attention.metadata import forward_context
from miniinfer.config import EngineConfig, ModelConfig
from miniinfer.engine.sequence import Sequence
from miniinfer.engine.step import ForwardOutput, InFlightStep, ScheduledSeq, SchedulerOutput, StepResult
from miniinfer.loader.model_loader import ModelSource, build_model
from miniinfer.parallel import TPGroup
from miniinfer.sample import SamplingMetadata, sample
from miniinfer.sampling_params import SamplingParams
from miniinfer.worker import kv_cache
from miniinfer.worker.cuda_graphs import MAX_LOGIT_ROWS, CUDAGraphs
from miniinfer.worker.host_staging import PinnedStaging
from miniinfer.worker.input_batch import meta_from_lists, prepare_inputs
from miniinfer.worker.warmup import warmup_schedules

log = logging.getLogger("miniinfer")


class ModelRunner:
    """Raises ``ValueError`` at construction if the KV-cache budget holds too little."""

    def __init__(self, cfg: EngineConfig, model_config: ModelConfig, source: ModelSource,
                 max_model_len: int, progress: bool = True, tp: TPGroup = TPGroup()):
        self.cfg = cfg
        self.tp = tp
        self.model_config = model_config
        self.device = torch.device(cfg.device)
        self.dtype = cfg.torch_dtype
        self.eos_token_ids: list[int] = list(model_config.eos_token_ids)  # banned before min_tokens
        self.backend = get_backend(cfg.attention_backend, cfg.device)
        self.model = build_model(source, model_config, self.backend, cfg, max_model_len,
                                 progress and tp.rank == 0, tp)
        self.kv_layout = self._plan_kv_cache(max_model_len)
        self.kv_caches = kv_cache.allocate_kv_cache(self.model, self.kv_layout, self.device)
        self.staging = PinnedStaging(self.device)
        self.sample_rng = random.Random(cfg.seed)  # seeds of unseeded rows (fused sampler, CUDA)
        self.cpu_generator = torch.Generator().manual_seed(cfg.seed)  # unseeded rows elsewhere
        if self.device.type == "cuda":
            n = max(cfg.max_num_seqs, 1)
            self._pinned = [torch.empty(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._pinned_turn = 0
        self.cuda_graphs: CUDAGraphs | None = None
        # Structured output's one hook: ``fill_bitmask(sampling_seqs) -> GrammarBitmask | None``,
        # called between the forward and the sampler (set by the engine when first needed).
        self.structured_output = None
        # EAGLE drafting reads the target's final hidden states of every step's tokens
        self.keep_hidden = False
        if self.device.type == "cuda" and cfg.warmup and not tp.enabled:
            self.warmup()
        if self.device.type == "cuda" and not cfg.enforce_eager and not tp.enabled:
            self.capture_cuda_graphs()

    @property
    def block_size(self) -> int:
        return self.kv_layout.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv_layout.num_blocks

    # --- KV cache --------------------------------------------------------------------
    def _plan_kv_cache(self, max_model_len: int) -> kv_cache.KVCacheLayout:
        m, cfg = self.model_config, self.cfg
        # The torch attention path (CPU) computes in fp32 whatever the model dtype: keeping the
        # CPU cache in fp32 saves an upcast copy of every gathered K/V in every layer.
        dtype = self.dtype if self.device.type == "cuda" else torch.float32
        kv_heads = self.model.layers[0].self_attn.num_kv_heads
        num_blocks = cfg.num_kv_blocks
        if num_blocks is None:
            if self.device.type == "cuda":
                budget = kv_cache.free_gpu_bytes_after(lambda: self._profile_run(max_model_len),
                                                       cfg.gpu_memory_utilization)
            else:
                budget = int((cfg.kv_cache_memory_gb or 2.0) * (1 << 30))
            per_block = kv_cache.bytes_per_block(cfg.block_size, m.num_layers, kv_heads, m.head_dim, dtype)
            num_blocks = kv_cache.num_blocks_for_budget(budget, per_block, max_model_len, cfg.block_size,
                                                        cfg.max_num_seqs)
        if self.tp.enabled:  # every rank must hold the same number of blocks
            n = torch.tensor([num_blocks], device=self.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
            num_blocks = int(n.item())
        return kv_cache.make_layout(num_blocks, cfg.block_size, m.num_layers, kv_heads, m.head_dim, dtype,
                                    max_model_len)

    def _profile_run(self, max_model_len: int) -> None:
        """The largest forward, with a tiny temporary cache: one sequence per max_model_len chunk."""
        num_tokens = min(self.cfg.max_num_batched_tokens, max_model_len * self.cfg.max_num_seqs)
        bs, m = self.cfg.block_size, self.model_config
        tmp = kv_cache.KVCacheLayout(max(1, -(-num_tokens // bs)) + 1, bs, m.num_layers,
                                     self.model.layers[0].self_attn.num_kv_heads, m.head_dim, self.dtype,
                                     max_model_len)
        kv_cache.allocate_kv_cache(self.model, tmp, self.device)
        seq_len = min(num_tokens, max_model_len)
        n_seqs = -(-num_tokens // seq_len)
        lens = [seq_len] * (n_seqs - 1) + [num_tokens - seq_len * (n_seqs - 1)]
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        meta = meta_from_lists(lens, lens, [[0] for _ in lens],
                               torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device), 0, self.device)
        meta.block_tables = torch.zeros(len(lens), -(-seq_len // bs), dtype=torch.int32, device=self.device)
        with torch.inference_mode(), forward_context(meta):
            hidden = self.model(ids, pos)
            self.model.compute_logits(hidden[-self.cfg.max_num_seqs:])
        kv_cache.bind_kv_cache(self.model, None)

    # --- the step ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, sched: SchedulerOutput, prev: InFlightStep | None) -> ForwardOutput:
        """Queue the step's forward (and LM head on the sampling rows) without waiting.

        Inputs that are placeholders (tokens sampled by ``prev``, still on the device) are
        filled from ``prev``'s sampled-ids tensor on the device. Raises ``RuntimeError`` if a
        placeholder has no step in flight to come from."""
        batch, header, buf = prepare_inputs(sched, self.block_size, self.staging)
        if self.tp.enabled:  # the other ranks run the same forward on the same inputs
            from miniinfer.worker.tp_worker import broadcast_step
            broadcast_step(self.tp, header, buf)
        if batch.fill_at is not None:
            if self.tp.enabled:  # the workers get the buffer before the fill: overlap is off under TP
                raise RuntimeError("placeholder inputs under tensor parallelism (overlap scheduling must be off)")
            if prev is None or prev.token_ids is None:
                raise RuntimeError("a step input is a placeholder but no previous step is in flight")
            batch.input_ids[batch.fill_at] = prev.token_ids[batch.fill_rows]
        n = len(sched.scheduled)
        graphs = self.cuda_graphs
        if graphs is not None and graphs.fits_decode(batch, n):
            logits, hidden = graphs.replay_decode(batch)
        elif (graphs is not None and n == 1 and batch.sampling_seqs
              and batch.logits_indices.shape[0] <= MAX_LOGIT_ROWS
              and graphs.prefill_bucket(batch.input_ids.shape[0]) is not None):
            logits, hidden = graphs.replay_prefill(batch)
        else:
            with forward_context(batch.attn_metadata):
                hidden = self.model(batch.input_ids, batch.positions)
            if not batch.sampling_seqs:
                return ForwardOutput(sched, [], None, hidden=hidden if self.keep_hidden else None)
            logits = self.model.compute_logits(hidden[batch.logits_indices])
        return ForwardOutput(sched, batch.sampling_seqs, logits, batch.seq_rows,
                             hidden if self.keep_hidden else None)

    @torch.inference_mode()
    def sample(self, fwd: ForwardOutput) -> InFlightStep:
        """Sample the forward's logits and start copying the ids to the host (no wait)."""
        if fwd.logits is None:
            return InFlightStep(fwd.sched, [], None, None, None, None, hidden=fwd.hidden)
        if fwd.seq_rows is not None:
            return self._verify(fwd)
        md = SamplingMetadata.build(fwd.sampling_seqs, fwd.logits.shape[-1], self.device, self.eos_token_ids,
                                    to_device=self.staging.to_device, rng=self.sample_rng)
        if self.structured_output is not None:  # the host fills the mask while the forward runs
            md.grammar_bitmask = self.structured_output.fill_bitmask(fwd.sampling_seqs)
        self.staging.end_step()
        out = sample(fwd.logits, md, self.cpu_generator)
        event = None
        if self.device.type == "cuda":
            # Two preallocated pinned buffers, alternating: at most one step is in flight while
            # the next is launched, and a fresh pinned allocation per step could stall the device.
            self._pinned_turn ^= 1
            host = self._pinned[self._pinned_turn][:out.token_ids.shape[0]]
            host.copy_(out.token_ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = out.token_ids
        return InFlightStep(fwd.sched, fwd.sampling_seqs, out.token_ids, host, event,
                            out if md.want_logprobs else None, hidden=fwd.hidden)

    def _verify(self, fwd: ForwardOutput) -> InFlightStep:
        """Speculative verify: every sampling sequence's rows (its last token and drafts)
        through the rejection sampler; the committed tokens are read in ``collect``."""
        from miniinfer.spec_decode.rejection_sampler import rejection_sample
        row_seqs = [seq for seq, rows in zip(fwd.sampling_seqs, fwd.seq_rows) for _ in rows]
        md = SamplingMetadata.build(row_seqs, fwd.logits.shape[-1], self.device, self.eos_token_ids,
                                    to_device=self.staging.to_device, rng=self.sample_rng)
        if self.structured_output is not None:
            md.grammar_bitmask = self.structured_output.fill_bitmask(row_seqs)
        drafts = [s.draft_token_ids for s in fwd.sched.scheduled if s.samples]
        width = max(len(r) for r in fwd.seq_rows)
        draft_ids: list[int] = []
        row_index: list[int] = []
        for d, rows in zip(drafts, fwd.seq_rows):
            draft_ids.extend(d + [-1])
            row_index.extend(list(rows) + [-1] * (width - len(rows)))
        draft_t = self.staging.to_device(draft_ids, torch.int64)
        index_t = self.staging.to_device(row_index, torch.int64).view(len(drafts), width)
        self.staging.end_step()
        out = rejection_sample(fwd.logits, md, draft_t, index_t, fwd.seq_rows,
                               [s.generator for s in fwd.sampling_seqs], self.cpu_generator)
        return InFlightStep(fwd.sched, fwd.sampling_seqs, out.token_ids, None, None, out.sampler_output,
                            num_tokens=out.num_tokens, seq_rows=fwd.seq_rows, hidden=fwd.hidden)

    def launch(self, sched: SchedulerOutput, prev: InFlightStep | None) -> InFlightStep:
        """``forward`` then ``sample``: the whole step queued on the device."""
        return self.sample(self.forward(sched, prev))

    def collect(self, step: InFlightStep) -> StepResult:
        """Wait for a launched step's sampled ids (the step's only device-to-host sync)."""
        if step.token_ids is None:
            return StepResult([], None, hidden=step.hidden)
        if step.num_tokens is not None:  # speculative verify (synchronous steps)
            rows, counts = step.token_ids.tolist(), step.num_tokens.tolist()
            committed = [r[:n] for r, n in zip(rows, counts)]
            return StepResult([c[0] for c in committed], step.sampler_output, committed,
                              [r.start for r in step.seq_rows], hidden=step.hidden)
        if step.event is not None:
            step.event.synchronize()
        return StepResult(step.token_ids_host.tolist(), step.sampler_output, hidden=step.hidden)

    def execute(self, sched: SchedulerOutput) -> StepResult:
        """Launch and wait: one synchronous step."""
        return self.collect(self.launch(sched, None))

    @torch.inference_mode()
    def forward_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len(token_ids), V] float32 of every position of one prompt, through the
        paged path (for tests). The cache blocks it borrows are restored afterwards."""
        n = len(token_ids)
        nblocks = -(-n // self.block_size)
        seq = Sequence("logits", 0, list(token_ids), n, SamplingParams(max_tokens=1))
        seq.block_table = list(range(nblocks))
        batch, _, _ = prepare_inputs(SchedulerOutput([ScheduledSeq(seq, n, 0)]), self.block_size, self.staging)
        saved = self.kv_caches[:, :, :nblocks].clone()  # may hold cached prefix pages or a live sequence's
        try:
            with forward_context(batch.attn_metadata):
                hidden = self.model(batch.input_ids, batch.positions)
        finally:
            self.kv_caches[:, :, :nblocks] = saved
        return self.model.compute_logits(hidden)

    # --- start-up ----------------------------------------------------------------------
    def capture_cuda_graphs(self) -> None:
        self.cuda_graphs = CUDAGraphs(self.model, self.backend, self.cfg.max_num_seqs, self.kv_layout.max_model_len,
                                      self.block_size, self.device)
        self.cuda_graphs.capture()

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile every kernel before the first request (see ``worker/warmup.py``)."""
        for sched in warmup_schedules(self.block_size, self.num_blocks, self.kv_layout.max_model_len, self.device):
            self.execute(sched)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
