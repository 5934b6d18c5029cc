"""The model runner: a scheduled step in, device work queued, sampled ids back.

Owns the model, the KV-cache tensors and the CUDA graphs. Per step the engine calls
``forward`` (``prepare_forward``: pack the inputs and queue their copy; ``run_forward``: fill
placeholders, run the model, a graph or eager; deferred sampling calls the two apart) and then
``sample`` (sampling metadata, the sampler, a non-blocking copy of the ids to pinned host
memory); ``launch`` is the two in a row. Between them the host may work on the previous step
(and, with structured output, fill the grammar bitmask that ``sample`` applies).
``collect`` waits for a launched step's ids: a step's only device-to-host synchronization.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

from miniinfer.attention import get_backend
from miniinfer.attention.metadata import cache_slot, forward_context
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
from miniinfer.worker.input_batch import (InputBatch, StepHeader, inputs_from_host, meta_from_lists,
                                         prepare_inputs)
from miniinfer.worker.warmup import warmup_schedules

log = logging.getLogger("miniinfer")

FILL = object()  # ``sample``'s default: structured output fills the grammar mask there


@dataclass
class PreparedForward:
    """A step whose inputs are packed and queued for the device, its model not run yet."""
    sched: SchedulerOutput
    batch: InputBatch


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
        if hasattr(self.backend, "set_prefill_attention"):  # long prefill chunks: SDPA + paged prefix
            self.backend.set_prefill_attention(cfg.prefill_attention)
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
        # Tensor parallelism: rank 0 publishes every step here (worker/step_channel.py; set
        # after start-up, whose warm-up and graph captures every rank runs alike on its own);
        # ``tp_alive()`` says whether the other ranks still live (checked while waiting).
        self.channel = None
        self.tp_alive = None
        if tp.enabled:  # placeholders' sampled ids, sent from rank 0 to the others
            self._tp_ids = torch.zeros(max(cfg.max_num_seqs, 1), dtype=torch.int64, device=self.device)
        if self.device.type == "cuda" and cfg.warmup:
            self.warmup()
        if self.device.type == "cuda" and not cfg.enforce_eager:
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
        # model dtype on CUDA, fp32 on CPU (no upcast per gather), or fp8 (kv_cache_dtype)
        dtype = kv_cache.kv_cache_torch_dtype(cfg.kv_cache_dtype, self.dtype, self.device.type)
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
                                     self.model.layers[0].self_attn.num_kv_heads, m.head_dim,
                                     kv_cache.kv_cache_torch_dtype(self.cfg.kv_cache_dtype, self.dtype, self.device.type),
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
        """Queue the step's forward (and LM head on the sampling rows) without waiting:
        ``run_forward(prepare_forward(sched), prev)``. Raises as those do."""
        return self.run_forward(self.prepare_forward(sched), prev)

    @torch.inference_mode()
    def prepare_forward(self, sched: SchedulerOutput) -> PreparedForward:
        """Pack the step's inputs and queue their copy to the device; nothing here reads the
        previous step's sampled ids, so it may run before that step is sampled (the engine's
        deferred sampling). Raises ``RuntimeError`` if a tensor-parallel rank died (its
        collectives would never complete: seen to block the host in the placeholder broadcast)."""
        if self.tp_alive is not None and not self.tp_alive():
            raise RuntimeError("a tensor-parallel rank died: the step can't run")
        batch, header, host = prepare_inputs(sched, self.block_size, self.staging)
        if self.channel is not None:  # the other ranks run the same forward on the same inputs
            self.channel.publish(header, host)
        return PreparedForward(sched, batch)

    @torch.inference_mode()
    def run_forward(self, prepared: PreparedForward, prev: InFlightStep | None) -> ForwardOutput:
        """Queue a prepared step's model run: inputs that are placeholders (tokens sampled by
        ``prev``, still on the device) are filled from ``prev``'s sampled-ids tensor first.
        Raises ``RuntimeError`` if a placeholder has no step in flight to come from."""
        sched, batch = prepared.sched, prepared.batch
        if batch.fill_at is not None:
            if prev is None or prev.token_ids is None:
                raise RuntimeError("a step input is a placeholder but no previous step is in flight")
            ids = self._share_sampled(prev.token_ids) if self.tp.enabled else prev.token_ids
            batch.input_ids[batch.fill_at] = ids[batch.fill_rows]
        logits, hidden = self._run_model(batch, len(sched.scheduled))
        if logits is None:
            return ForwardOutput(sched, [], None, hidden=hidden if self.keep_hidden else None)
        if (batch.seq_rows is None and self.cfg.speculative_config is not None
                and any(seq.params.seed is not None for seq in batch.sampling_seqs)):
            # a seeded request draws by position in every step (the verify's scheme), so its
            # tokens don't depend on whether a step also verified someone's drafts
            batch.seq_rows = [range(i, i + 1) for i in range(len(batch.sampling_seqs))]
        return ForwardOutput(sched, batch.sampling_seqs, logits, batch.seq_rows,
                             hidden if self.keep_hidden else None)

    def _run_model(self, batch: InputBatch, num_scheduled: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits of the batch's logits rows or None when it has none, hidden): a decode or
        prefill graph when one fits, else eager. The choice depends only on what the packed
        inputs say, so every tensor-parallel rank makes the same one (same collectives)."""
        num_logits = batch.logits_indices.shape[0]
        graphs = self.cuda_graphs
        if graphs is not None and graphs.fits_decode(batch, num_scheduled):
            return graphs.replay_decode(batch)
        if (graphs is not None and num_scheduled == 1 and 0 < num_logits <= MAX_LOGIT_ROWS
                and graphs.prefill_bucket(batch.input_ids.shape[0]) is not None):
            return graphs.replay_prefill(batch)
        if graphs is not None and graphs.fits_verify(batch, num_scheduled):
            return graphs.replay_verify(batch)
        with forward_context(batch.attn_metadata):
            hidden = self.model(batch.input_ids, batch.positions)
        if num_logits == 0:
            return None, hidden
        return self.model.compute_logits(hidden[batch.logits_indices]), hidden

    def _share_sampled(self, token_ids: torch.Tensor | None) -> torch.Tensor:
        """Tensor parallelism with overlap scheduling: the last step's sampled ids exist on
        rank 0's device only; one broadcast (queued on the stream, no host wait) gives every
        rank the same ``[max_num_seqs]`` buffer to fill its placeholders from."""
        if token_ids is not None:
            self._tp_ids[:token_ids.shape[0]].copy_(token_ids)
        self.tp.broadcast(self._tp_ids)
        return self._tp_ids

    @torch.inference_mode()
    def run_published(self, header: StepHeader, host) -> None:
        """Ranks > 0: one step's forward from what rank 0 published (see ``forward``)."""
        batch = inputs_from_host(header, host, self.staging)
        if batch.fill_at is not None:
            batch.input_ids[batch.fill_at] = self._share_sampled(None)[batch.fill_rows]
        self._run_model(batch, header.num_seqs)

    @torch.inference_mode()
    def sample(self, fwd: ForwardOutput, grammar_bitmask=FILL) -> InFlightStep:
        """Sample the forward's logits and start copying the ids to the host (no wait).
        ``grammar_bitmask``: the rows' mask when the caller filled it (a ``GrammarBitmask`` or
        None), else (``FILL``) structured output fills it here, while the forward runs."""
        if fwd.logits is None:
            return InFlightStep(fwd.sched, [], None, None, None, None, hidden=fwd.hidden)
        if fwd.seq_rows is not None:
            return self._verify(fwd)
        md = SamplingMetadata.build(fwd.sampling_seqs, fwd.logits.shape[-1], self.device, self.eos_token_ids,
                                    to_device=self.staging.to_device, rng=self.sample_rng)
        if grammar_bitmask is not FILL:
            md.grammar_bitmask = grammar_bitmask
        elif self.structured_output is not None:  # the host fills the mask while the forward runs
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
        from miniinfer.spec_decode.rejection_sampler import draw_rows, position_seeds, rejection_sample
        row_seqs = [seq for seq, rows in zip(fwd.sampling_seqs, fwd.seq_rows) for _ in rows]
        md = SamplingMetadata.build(row_seqs, fwd.logits.shape[-1], self.device, self.eos_token_ids,
                                    to_device=self.staging.to_device, rng=self.sample_rng)
        verified = [s for s in fwd.sched.scheduled if s.samples]
        drafts = [s.draft_token_ids for s in verified]
        parents = [s.draft_parents if s.draft_parents is not None else list(range(-1, len(s.draft_token_ids) - 1))
                   for s in verified]
        if self.structured_output is not None:  # one mask row per tree node, filled while the forward runs
            md.grammar_bitmask = self.structured_output.fill_verify_bitmask(fwd.sampling_seqs, drafts, parents,
                                                                            fwd.seq_rows)
        seeds = position_seeds(verified, parents)
        if not md.want_logprobs:  # only the draws go to the host; the trees are walked there
            self.staging.end_step()
            drawn = draw_rows(fwd.logits, md, seeds, self.cpu_generator)
            return InFlightStep(fwd.sched, fwd.sampling_seqs, drawn, None, None, None, seq_rows=fwd.seq_rows,
                                hidden=fwd.hidden, spec_trees=(drafts, parents))
        width = max(len(r) for r in fwd.seq_rows)
        node_tokens: list[int] = []
        parent_rows: list[int] = []
        row_index: list[int] = []
        for d, par, rows in zip(drafts, parents, fwd.seq_rows):
            node_tokens.extend([-1] + d)
            parent_rows.extend([-1] + [rows.start + p + 1 for p in par])
            row_index.extend(list(rows) + [-1] * (width - len(rows)))
        tokens_t = self.staging.to_device(node_tokens, torch.int64)
        parents_t = self.staging.to_device(parent_rows, torch.int64)
        index_t = self.staging.to_device(row_index, torch.int64).view(len(drafts), width)
        self.staging.end_step()
        out = rejection_sample(fwd.logits, md, tokens_t, parents_t, index_t, fwd.seq_rows, seeds, self.cpu_generator)
        return InFlightStep(fwd.sched, fwd.sampling_seqs, out.token_ids, None, None, out.sampler_output,
                            num_tokens=out.num_tokens, seq_rows=fwd.seq_rows, hidden=fwd.hidden, paths=out.paths)

    def launch(self, sched: SchedulerOutput, prev: InFlightStep | None) -> InFlightStep:
        """``forward`` then ``sample``: the whole step queued on the device."""
        return self.sample(self.forward(sched, prev))

    def collect(self, step: InFlightStep) -> StepResult:
        """Wait for a launched step's sampled ids (the step's only device-to-host sync)."""
        if step.collect_with is not None:
            return step.collect_with(step)
        if step.token_ids is None:
            return StepResult([], None, hidden=step.hidden)
        if step.seq_rows is not None:  # speculative verify (synchronous steps)
            if step.spec_trees is not None:  # the walk on the host, from each row's draw
                from miniinfer.spec_decode.rejection_sampler import accept_paths
                committed, paths = accept_paths(step.token_ids.tolist(), *step.spec_trees, step.seq_rows)
            else:
                rows, counts = step.token_ids.tolist(), step.num_tokens.tolist()
                committed = [r[:n] for r, n in zip(rows, counts)]
                paths = [p[:n] for p, n in zip(step.paths.tolist(), counts)]
            self._compact_accepted_kv(step.sched, paths)
            return StepResult([c[0] for c in committed], step.sampler_output, committed,
                              [r.start for r in step.seq_rows], hidden=step.hidden, spec_paths=paths)
        if step.event is not None:
            self._wait_for(step.event)
        return StepResult(step.token_ids_host.tolist(), step.sampler_output, hidden=step.hidden)

    def _compact_accepted_kv(self, sched: SchedulerOutput, paths: list[list[int]]) -> None:
        """A draft tree's accepted path sits at scattered cache slots (its nodes' places in the
        verify); move its K/V to the consecutive positions the committed tokens now hold. A
        chain's path is already in place. Rejected nodes' slots are simply overwritten later."""
        src: list[int] = []
        dst: list[int] = []
        verified = [s for s in sched.scheduled if s.samples]
        for s, path in zip(verified, paths):
            for j, off in enumerate(path):
                if off != j:
                    src.append(cache_slot(s.seq.block_table, s.start + off, self.block_size))
                    dst.append(cache_slot(s.seq.block_table, s.start + j, self.block_size))
        if src:
            src_t, dst_t = (torch.tensor(x, device=self.device) for x in (src, dst))
            flat = self.kv_caches.flatten(2, 3)  # [2, layers, slots, kv_heads, head_dim]
            if flat.element_size() == 1:  # (fp8: moved as bytes)
                flat = flat.view(torch.uint8)
            flat[:, :, dst_t] = flat[:, :, src_t]  # gathered first: overlapping moves are safe

    def _wait_for(self, event) -> None:
        """``event.synchronize()``; under tensor parallelism a poll that raises ``RuntimeError``
        if another rank died (its collectives would never complete: no hang)."""
        if self.tp_alive is None:
            event.synchronize()
            return
        spins = 0
        while not event.query():
            spins += 1
            if spins % 256 == 0 and not self.tp_alive():
                raise RuntimeError("a tensor-parallel rank died: the step can't complete")
            time.sleep(0)

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
        spec = self.cfg.speculative_config  # verify graphs: 1 + the drafts of one sequence rows each
        # (a tree's nodes; chain drafters may propose num_speculative_tokens whatever num_draft_tokens says)
        drafts = max(spec.max_draft_tokens, spec.num_speculative_tokens) if spec is not None else -1
        self.cuda_graphs = CUDAGraphs(self.model, self.backend, self.cfg.max_num_seqs, self.kv_layout.max_model_len,
                                      self.block_size, self.device, verify_rows=1 + drafts)
        self.cuda_graphs.capture()

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile every kernel before the first request (see ``worker/warmup.py``)."""
        for sched in warmup_schedules(self.block_size, self.num_blocks, self.kv_layout.max_model_len, self.device,
                                      self.cfg.max_num_seqs):
            self.execute(sched)
        if getattr(self.backend, "prefill_attention", None) == "auto" and self.dtype != torch.float32:
            from miniinfer.attention.prefill_split import warmup_split
            attn = self.model.layers[0].self_attn
            warmup_split(attn.num_heads, attn.num_kv_heads, attn.head_dim, self.dtype, self.device,
                         min(self.cfg.max_num_batched_tokens, self.kv_layout.max_model_len), attn.scale)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

