"""Turns a scheduled batch into tensors, runs the model and samples.

Owns the model, the KV-cache tensors and (on CUDA) the captured decode graphs.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

from miniinfer.attention import get_backend
from miniinfer.config import EngineConfig, ModelConfig
from miniinfer.attention.metadata import AttentionMetadata, forward_context
from miniinfer.engine.host_staging import PinnedStaging
from miniinfer.engine.sampler import SamplerOutput, SamplingBatch, sample
from miniinfer.engine.scheduler import SchedulerOutput
from miniinfer.loader.model_loader import ModelSource, build_model
from miniinfer.parallel import TPGroup

log = logging.getLogger("miniinfer")
STEP, STOP = 1, 0  # first word of the header rank 0 broadcasts to tensor-parallel workers


@dataclass
class InFlightStep:
    """A step launched on the device whose sampled ids haven't been read on the host yet."""
    sched: SchedulerOutput
    sampling_seqs: list
    token_ids: torch.Tensor | None  # [n] on the device
    token_ids_host: torch.Tensor | None  # pinned copy, valid once `event` has completed
    event: "torch.cuda.Event | None"
    sampler_output: SamplerOutput | None


@dataclass
class StepResult:
    """Host-side results of one step, for the sequences that sampled (in scheduled order)."""
    token_ids: list[int]
    sampler_output: SamplerOutput | None  # device tensors, kept for logprobs


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_config: ModelConfig, source: ModelSource,
                 max_model_len: int, progress: bool = True, tp: TPGroup = TPGroup()):
        self.cfg = cfg
        self.tp = tp
        self.model_config = model_config
        self.device = torch.device(cfg.device)
        self.dtype = cfg.torch_dtype
        # The torch attention path (CPU) computes in fp32 whatever the model dtype: keeping the
        # CPU cache in fp32 saves an upcast copy of every gathered K/V in every layer.
        self.kv_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        self.max_model_len = max_model_len
        self.block_size = cfg.block_size
        self.eos_token_ids: list[int] = list(model_config.eos_token_ids)  # the engine may add more
        self.backend = get_backend(cfg.attention_backend, cfg.device)
        t0 = time.perf_counter()
        self.model = build_model(source, model_config, self.backend, cfg, max_model_len,
                                 progress and tp.rank == 0, tp)
        self.num_local_kv_heads = self.model.layers[0].self_attn.num_kv_heads
        self.load_seconds = time.perf_counter() - t0
        self.num_blocks = self._num_kv_blocks()
        if tp.enabled:  # every rank must hold the same number of blocks
            n = torch.tensor([self.num_blocks], device=self.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
            self.num_blocks = int(n.item())
        self._allocate_kv_cache(self.num_blocks)
        self.staging = PinnedStaging(self.device)
        self.sample_rng = random.Random(cfg.seed)  # seeds of unseeded rows (fused sampler, CUDA)
        if self.device.type == "cuda":
            n = max(cfg.max_num_seqs, 1)
            self._pinned = [torch.empty(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._pinned_turn = 0
        self.graphs: dict[int, tuple] = {}  # decode batch size -> (replay, logits)
        self.prefill_graphs: dict[int, tuple] = {}  # prefill token bucket -> (replay, logits)
        self.max_graph_bs = 0
        self.graph_seconds = self.warmup_seconds = 0.0
        if self.device.type == "cuda" and cfg.warmup and not tp.enabled:
            t0 = time.perf_counter()
            self.warmup()
            self.warmup_seconds = time.perf_counter() - t0
        if self.device.type == "cuda" and not cfg.enforce_eager and not tp.enabled:
            t0 = time.perf_counter()
            self.capture_cuda_graphs()
            self.graph_seconds = time.perf_counter() - t0

    # --- KV cache ------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        m = self.model_config
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        return 2 * m.num_layers * self.block_size * self.num_local_kv_heads * m.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.cfg.num_kv_blocks is not None:
            return self.cfg.num_kv_blocks
        per_seq = -(-self.max_model_len // self.block_size)
        cap = self.cfg.max_num_seqs * per_seq
        if self.device.type == "cuda":
            budget = self._profile_free_gpu_bytes()
        else:
            budget = int((self.cfg.kv_cache_memory_gb or 2.0) * (1 << 30))
        n = min(cap, budget // self.kv_bytes_per_block())
        if n < per_seq // 4 or n < 1:
            raise ValueError(f"KV-cache budget holds only {n} blocks of {self.block_size} tokens; "
                             f"raise the memory budget or lower max_model_len ({self.max_model_len})")
        return n

    def _profile_free_gpu_bytes(self) -> int:
        """Free memory for the KV cache: the card's share minus weights and a profiling step."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        tokens = min(self.cfg.max_num_batched_tokens, self.max_model_len * self.cfg.max_num_seqs)
        self._profile_run(tokens)
        torch.cuda.synchronize()
        # The profiling step's activation blocks stay in PyTorch's allocator cache (no
        # empty_cache): the first real large step reuses them instead of paying cudaMalloc
        # mid-request (a fresh 2k-token prefill measured 34 ms the first time, 16 ms later).
        # So the budget subtracts what the allocator *reserves*, not just the peak in use.
        reserved = max(torch.cuda.memory_reserved(), torch.cuda.max_memory_allocated())
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = int(total * self.cfg.gpu_memory_utilization) - reserved - max(used_by_others, 0)
        return max(budget, 0)

    def _profile_run(self, num_tokens: int) -> None:
        # A forward with a tiny temporary cache: one sequence per max_model_len chunk.
        self._allocate_kv_cache(max(1, -(-num_tokens // self.block_size)) + 1)
        seq_len = min(num_tokens, self.max_model_len)
        n_seqs = -(-num_tokens // seq_len)
        lens = [seq_len] * (n_seqs - 1) + [num_tokens - seq_len * (n_seqs - 1)]
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        meta = self._meta_from_lists(
            q_lens=lens, seq_lens=lens, block_tables=[[0] for _ in lens],
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device), num_decodes=0)
        meta.block_tables = torch.zeros(len(lens), -(-seq_len // self.block_size), dtype=torch.int32,
                                        device=self.device)
        with torch.inference_mode(), forward_context(meta):
            hidden = self.model(ids, pos)
            self.model.compute_logits(hidden[-self.cfg.max_num_seqs:])
        self.kv_caches = None
        for layer in self.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = torch.empty(0)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.model_config
        shape = (2, m.num_layers, num_blocks, self.block_size, self.num_local_kv_heads, m.head_dim)
        self.kv_caches = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache = self.kv_caches[0, i]
            layer.self_attn.v_cache = self.kv_caches[1, i]

    # --- batch preparation ----------------------------------------------------------
    def _meta_from_lists(self, q_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
                         slot_mapping: torch.Tensor, num_decodes: int) -> AttentionMetadata:
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        dev = self.device
        return AttentionMetadata(
            num_decodes=num_decodes,
            num_decode_tokens=num_decodes,
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            slot_mapping=slot_mapping,
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=list(seq_lens),
        )

    def prepare(self, sched: SchedulerOutput):
        """Flatten the batch into one host int64 buffer and copy it to the device once."""
        self.staging.begin_step()
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_lens, seq_lens, tables, logits_idx, sampling_seqs = [], [], [], [], []
        fill_at: list[int] = []  # flat positions whose input is a placeholder ...
        fill_rows: list[int] = []  # ... and the row of the previous step's sampled ids to take
        bs = self.block_size
        num_decodes = 0
        for s in sched.scheduled:
            seq, n, start = s.seq, s.num_new_tokens, s.start
            table = seq.block_table
            end = start + n
            if n == 1:
                num_decodes += 1
                token = seq.token_ids[start]
                if token < 0:
                    fill_at.append(len(input_ids))
                    fill_rows.append(seq.pending_row)
                input_ids.append(token)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            q_lens.append(n)
            seq_lens.append(end)
            tables.append(table)
            if s.samples:
                logits_idx.append(len(input_ids) - 1)
                sampling_seqs.append(seq)
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)
        width = max(map(len, tables))
        flat_tables: list[int] = []
        for t in tables:
            flat_tables.extend(t)
            flat_tables.extend([0] * (width - len(t)))
        header = [STEP, len(input_ids), len(logits_idx), len(q_lens), width, len(fill_at), num_decodes,
                  max(q_lens), max(seq_lens)]
        dev_buf = self.staging.to_device(input_ids + positions + slots + logits_idx + qsl + seq_lens
                                         + flat_tables + fill_at + fill_rows, torch.int64)
        self.staging.end_step()
        if self.tp.enabled:  # the other ranks run the same forward on the same inputs
            self.tp.broadcast(torch.tensor(header, dtype=torch.int64).to(self.device))
            self.tp.broadcast(dev_buf)
        input_ids_t, positions_t, meta, logits_idx_t, fill = self._unpack(dev_buf, header)
        meta.query_start_loc_cpu, meta.seq_lens_cpu = qsl, seq_lens
        return input_ids_t, positions_t, meta, logits_idx_t, sampling_seqs, fill

    @staticmethod
    def _unpack(buf: torch.Tensor, header: list[int]):
        """Inverse of the packing in ``prepare``: views into the one device buffer."""
        _, t, nl, b, width, nf, num_decodes, max_q, max_len = header
        parts = torch.split(buf, [t, t, t, nl, b + 1, b, b * width, nf, nf])
        meta = AttentionMetadata(
            num_decodes=num_decodes, num_decode_tokens=num_decodes,
            query_start_loc=parts[4].to(torch.int32), seq_lens=parts[5].to(torch.int32),
            block_tables=parts[6].view(b, width).to(torch.int32), slot_mapping=parts[2],
            max_query_len=max_q, max_seq_len=max_len)
        fill = (parts[7], parts[8]) if nf else None
        return parts[0], parts[1], meta, parts[3], fill

    # --- tensor-parallel workers (ranks > 0) ------------------------------------------------
    def serve_worker(self) -> None:
        """Ranks > 0: run every forward rank 0 broadcasts, until it broadcasts STOP."""
        header_t = torch.empty(9, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            while True:
                self.tp.broadcast(header_t)
                header = header_t.tolist()
                if header[0] == STOP:
                    return
                t, nl, b, width, nf = header[1:6]
                buf = torch.empty(3 * t + nl + 2 * b + 1 + b * width + 2 * nf, dtype=torch.int64,
                                  device=self.device)
                self.tp.broadcast(buf)
                input_ids, positions, meta, logits_idx, _ = self._unpack(buf, header)
                with forward_context(meta):
                    hidden = self.model(input_ids, positions)
                if nl:
                    self.model.compute_logits(hidden[logits_idx])

    def stop_workers(self) -> None:
        if self.tp.enabled and self.tp.rank == 0:
            header = [STOP] + [0] * 8
            self.tp.broadcast(torch.tensor(header, dtype=torch.int64).to(self.device))

    # --- execution --------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        """Launch and wait: one synchronous step."""
        return self.collect(self.launch(sched, None))

    def collect(self, step: InFlightStep) -> StepResult:
        """Wait for a launched step's sampled ids (the step's only device-to-host sync)."""
        if step.token_ids is None:
            return StepResult([], None)
        if step.event is not None:
            step.event.synchronize()
        return StepResult(step.token_ids_host.tolist(), step.sampler_output)

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: InFlightStep | None) -> InFlightStep:
        """Queue the step's forward and sampling on the device without waiting for it.

        Inputs that are placeholders (tokens sampled by ``prev``, still on the device) are
        filled from ``prev``'s sampled-ids tensor on the device."""
        input_ids, positions, meta, logits_idx, sampling_seqs, fill = self.prepare(sched)
        if fill is not None:
            if prev is None or prev.token_ids is None:
                raise RuntimeError("a step input is a placeholder but no previous step is in flight")
            input_ids[fill[0]] = prev.token_ids[fill[1]]
        n = len(sched.scheduled)
        if self.graphs and meta.num_decodes == n and len(sampling_seqs) == n and n <= self.max_graph_bs:
            logits = self._replay_graph(input_ids, positions, meta)
        elif (n == 1 and sampling_seqs and self.prefill_graphs
              and self._prefill_graph_for(input_ids.shape[0]) is not None):
            logits = self._replay_prefill_graph(input_ids, positions, meta, logits_idx)
        else:
            with forward_context(meta):
                hidden = self.model(input_ids, positions)
            if not sampling_seqs:
                return InFlightStep(sched, [], None, None, None, None)
            logits = self.model.compute_logits(hidden[logits_idx])
        batch = SamplingBatch.build(sampling_seqs, logits.shape[-1], self.device, self.eos_token_ids,
                                    to_device=self.staging.to_device, rng=self.sample_rng)
        self.staging.end_step()
        out = sample(logits, batch)
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
        return InFlightStep(sched, sampling_seqs, out.token_ids, host, event,
                            out if batch.want_logprobs else None)

    @torch.inference_mode()
    def forward_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of every position of one prompt, through the paged path (for tests)."""
        from miniinfer.engine.scheduler import ScheduledSeq
        from miniinfer.engine.sequence import Sequence
        from miniinfer.sampling_params import SamplingParams
        n = len(token_ids)
        nblocks = -(-n // self.block_size)
        seq = Sequence("logits", 0, list(token_ids), n, SamplingParams(max_tokens=1))
        seq.block_table = list(range(nblocks))
        sched = SchedulerOutput([ScheduledSeq(seq, n, 0)])
        input_ids, positions, meta, _, _, _ = self.prepare(sched)
        # The forward writes K/V into blocks 0..nblocks-1, which may hold cached prefix pages
        # (or a live sequence's): put them back afterwards.
        saved = self.kv_caches[:, :, :nblocks].clone()
        try:
            with forward_context(meta):
                hidden = self.model(input_ids, positions)
        finally:
            self.kv_caches[:, :, :nblocks] = saved
        return self.model.compute_logits(hidden)

    # --- CUDA graphs ---------------------------------------------------------------------
    # Two families, sharing one memory pool and replayed one at a time:
    #   decode graphs:  B sequences x 1 token (B bucketed), forward + LM head of every row;
    #   prefill graphs: one sequence's chunk of n <= T tokens (T bucketed), LM head of row n-1.
    # Replays copy the step's inputs into static buffers. Padding rows write no K/V (slot -1)
    # and are never read: decode pads attend over one token of block 0; prefill pads lie
    # outside the sequence's query range (rows are independent everywhere else).
    PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048)

    def _graph_sizes(self) -> list[int]:
        top = min(self.cfg.max_num_seqs, 512)
        sizes = [b for b in (1, 2, 4, 8) if b <= top] + list(range(16, top + 1, 16))
        if sizes[-1] != top:
            sizes.append(top)
        return sizes

    def _capture(self, fn, pool):
        """Capture ``fn`` (returning a tensor) as a CUDA graph; returns (replay, output, pool).
        Off CUDA (tests of the padding logic) the "graph" just reruns ``fn`` into the output."""
        with torch.inference_mode():
            fn()  # eager run first: allocator and kernels warm
            if self.device.type != "cuda":
                out = fn()
                return (lambda: out.copy_(fn())), out, pool
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = fn()
            return graph.replay, out, pool if pool is not None else graph.pool()

    def capture_cuda_graphs(self) -> None:
        sizes = self._graph_sizes()
        self.max_graph_bs = top = sizes[-1]
        max_blocks = -(-self.max_model_len // self.block_size)
        dev = self.device
        i64, i32 = dict(dtype=torch.int64, device=dev), dict(dtype=torch.int32, device=dev)
        ntok = max(top, max(self.PREFILL_GRAPH_TOKENS))
        self.g_input_ids = torch.zeros(ntok, **i64)
        self.g_positions = torch.zeros(ntok, **i64)
        self.g_slots = torch.full((ntok,), -1, **i64)
        self.g_seq_lens = torch.ones(top, **i32)
        self.g_block_tables = torch.zeros(top, max_blocks, **i32)
        self.g_qsl = torch.arange(top + 1, **i32)
        self.g_prefill_qsl = torch.zeros(2, **i32)
        self.g_logit_row = torch.zeros(1, **i64)
        pool = None
        model = self.model
        for bs in reversed(sizes):
            meta = AttentionMetadata(
                num_decodes=bs, num_decode_tokens=bs, query_start_loc=self.g_qsl[:bs + 1],
                seq_lens=self.g_seq_lens[:bs], block_tables=self.g_block_tables[:bs],
                slot_mapping=self.g_slots[:bs], max_query_len=1, max_seq_len=self.max_model_len)

            def decode(bs=bs, meta=meta):
                with forward_context(meta):
                    return model.compute_logits(model(self.g_input_ids[:bs], self.g_positions[:bs]))
            replay, logits, pool = self._capture(decode, pool)
            self.graphs[bs] = (replay, logits)
        self.prefill_graphs = {}
        for t in sorted((t for t in self.PREFILL_GRAPH_TOKENS if t < self.max_model_len), reverse=True):
            meta = AttentionMetadata(
                num_decodes=0, num_decode_tokens=0, query_start_loc=self.g_prefill_qsl,
                seq_lens=self.g_seq_lens[:1], block_tables=self.g_block_tables[:1],
                slot_mapping=self.g_slots[:t], max_query_len=t, max_seq_len=self.max_model_len)
            self.g_prefill_qsl[1] = t
            self.g_seq_lens[0] = t

            def prefill(t=t, meta=meta):
                with forward_context(meta):
                    hidden = model(self.g_input_ids[:t], self.g_positions[:t])
                    return model.compute_logits(hidden[self.g_logit_row])
            replay, logits, pool = self._capture(prefill, pool)
            self.prefill_graphs[t] = (replay, logits)
        self.g_seq_lens.fill_(1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _replay_graph(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        bs = next(b for b in sorted(self.graphs) if b >= n)
        replay, logits = self.graphs[bs]
        self.g_input_ids[:n].copy_(input_ids)
        self.g_positions[:n].copy_(positions)
        self.g_slots[:n].copy_(meta.slot_mapping)
        self.g_slots[n:bs].fill_(-1)
        self.g_seq_lens[:n].copy_(meta.seq_lens)
        self.g_seq_lens[n:bs].fill_(1)
        width = meta.block_tables.shape[1]
        self.g_block_tables[:n, :width].copy_(meta.block_tables)
        replay()
        return logits[:n]

    def _prefill_graph_for(self, n: int):
        for t in sorted(self.prefill_graphs):
            if t >= n:
                return t
        return None

    def _replay_prefill_graph(self, input_ids, positions, meta: AttentionMetadata, logits_idx) -> torch.Tensor:
        n = input_ids.shape[0]
        t = self._prefill_graph_for(n)
        replay, logits = self.prefill_graphs[t]
        self.g_input_ids[:n].copy_(input_ids)
        self.g_positions[:n].copy_(positions)
        self.g_slots[:n].copy_(meta.slot_mapping)
        self.g_slots[n:t].fill_(-1)
        self.g_prefill_qsl.copy_(meta.query_start_loc)
        self.g_seq_lens[:1].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.g_block_tables[:1, :width].copy_(meta.block_tables)
        self.g_logit_row.copy_(logits_idx)
        replay()
        self.g_seq_lens[:1].fill_(1)
        return logits

    # --- warmup ---------------------------------------------------------------------------
    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile every kernel before the first request: prefill/extend and decode shapes of
        each specialization class, mixed steps, and each sampler path."""
        from miniinfer.engine.scheduler import ScheduledSeq
        from miniinfer.engine.sequence import Sequence
        from miniinfer.sampling_params import SamplingParams
        bs = self.block_size
        plans = [  # (prompt lengths, new tokens per seq), chosen to hit Triton's int specializations
            ([1], [1]), ([16], [16]), ([37], [37]), ([64, 37], [64, 37]), ([300, 17], [44, 1]),
            ([200, 150, 9], [1, 130, 9]),  # >64 new tokens: the largest extend query tile
            ([33, 20, 9], [1, 1, 1]), ([129] * 5, [1] * 5),
        ]
        samplers = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05),
                    SamplingParams(temperature=1.0, repetition_penalty=1.1, presence_penalty=0.1, seed=1,
                                   logprobs=2)]
        for i, (lens, news) in enumerate(plans):
            sched = SchedulerOutput()
            next_block = 0
            for ln, n in zip(lens, news):
                ln = min(ln, self.max_model_len - 1)
                seq = Sequence("warmup", 0, [1] * ln, ln, samplers[i % len(samplers)])
                if seq.params.seed is not None:
                    seq.generator = torch.Generator(device=self.device).manual_seed(0)
                nb = -(-ln // bs)
                if next_block + nb > self.num_blocks:
                    break
                seq.block_table = list(range(next_block, next_block + nb))
                next_block += nb
                sched.scheduled.append(ScheduledSeq(seq, min(n, ln), ln - min(n, ln)))
            if sched.scheduled:
                sched.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
                self.execute(sched)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
