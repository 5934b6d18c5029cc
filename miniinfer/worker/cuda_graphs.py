"""CUDA graphs of the forward (+ LM head), in two families sharing one memory pool:

* decode graphs: B sequences × 1 token, B bucketed (1, 2, 4, 8, then multiples of 16 up
  to ``min(max_num_seqs, 512)``), logits of every row;
* prefill graphs: one sequence's chunk of n ≤ T tokens, T bucketed (16 … 2048), logits of
  up to min(T, ``MAX_LOGIT_ROWS``) rows: the last (a prefill) or the last 1 + k (a speculative
  verify of k drafts or tree nodes). The LM head reads its weights once either way;
* verify graphs (with speculative decoding, ``verify_rows`` > 0): B ≥ 2 sequences
  (bucketed as the decode graphs, up to ``MAX_VERIFY_SEQS``) of at most ``verify_rows``
  tokens each, every row's logits: a speculative verify of several sequences, which would
  otherwise run eager (a kernel launch per op per layer).

Replays copy the step's token inputs into this module's static buffers and its attention
metadata into the attention backend's (``backend.make_graph_buffers``; padding rows write
no K/V and are never read). Off CUDA (tests of the padding logic) a "graph" reruns the
function into its output instead.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from miniinfer.attention.metadata import forward_context
from miniinfer.worker.input_batch import InputBatch

PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048)
MAX_LOGIT_ROWS = 64  # = 1 + spec_decode.config.MAX_TREE_NODES (a bucket of t tokens computes min(t, 64))
MAX_VERIFY_ROWS = 16  # verify graphs: tokens per sequence at most (1 + drafts)
MAX_VERIFY_SEQS = 32
VERIFY_GRAPHS_ENV = "MINIINFER_VERIFY_GRAPHS"  # "0": no verify graphs (A/B)


def decode_batch_sizes(max_num_seqs: int) -> list[int]:
    top = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4, 8) if b <= top] + list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


class CUDAGraphs:
    def __init__(self, model, backend, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, verify_rows: int = 0):
        self.model = model
        self.device = device
        self.sizes = decode_batch_sizes(max_num_seqs)
        self.max_decode_bs = self.sizes[-1]
        self.prefill_tokens = sorted(t for t in PREFILL_GRAPH_TOKENS if t < max_model_len)
        ntok = max(self.max_decode_bs, max(PREFILL_GRAPH_TOKENS))
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(ntok, **i64)
        self.positions = torch.zeros(ntok, **i64)
        self.logit_rows = torch.zeros(MAX_LOGIT_ROWS, **i64)
        self.attn = backend.make_graph_buffers(self.max_decode_bs, ntok, -(-max_model_len // block_size),
                                               max_model_len, device)
        self.decode: dict[int, tuple[Callable, torch.Tensor]] = {}  # batch size -> (replay, logits)
        self.prefill: dict[int, tuple[Callable, torch.Tensor]] = {}  # token bucket -> (replay, logits)
        if os.environ.get(VERIFY_GRAPHS_ENV, "1") == "0":  # A/B switch: verifies of B >= 2 run eager
            verify_rows = 0
        self.verify_rows = verify_rows if 0 < verify_rows <= MAX_VERIFY_ROWS else 0
        self.verify_sizes = [b for b in self.sizes if 2 <= b <= MAX_VERIFY_SEQS] if self.verify_rows else []
        self.verify_logit_rows = torch.zeros(MAX_VERIFY_SEQS * MAX_VERIFY_ROWS, **i64)
        self.verify: dict[int, tuple[Callable, torch.Tensor]] = {}  # sequences bucket -> (replay, logits)

    def _capture(self, fn, pool):
        """Capture ``fn`` (returning a tuple of tensors); returns (replay, outputs, pool)."""
        with torch.inference_mode():
            fn()  # eager run first: allocator and kernels warm
            if self.device.type != "cuda":
                out = fn()
                return (lambda: [o.copy_(n) for o, n in zip(out, fn())]), out, pool
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = fn()
            return graph.replay, out, pool if pool is not None else graph.pool()

    def capture(self) -> None:
        model, pool = self.model, None
        for bs in reversed(self.sizes):
            meta = self.attn.capture_metadata("decode", bs)

            def decode(bs=bs, meta=meta):
                with forward_context(meta):
                    hidden = model(self.input_ids[:bs], self.positions[:bs])
                    return model.compute_logits(hidden), hidden
            replay, out, pool = self._capture(decode, pool)
            self.decode[bs] = (replay, out)
        for t in reversed(self.prefill_tokens):
            meta = self.attn.capture_metadata("prefill", t)

            def prefill(t=t, meta=meta):
                with forward_context(meta):
                    hidden = model(self.input_ids[:t], self.positions[:t])
                    return model.compute_logits(hidden[self.logit_rows[:min(t, MAX_LOGIT_ROWS)]]), hidden
            replay, out, pool = self._capture(prefill, pool)
            self.prefill[t] = (replay, out)
        for bs in reversed(self.verify_sizes):
            t, meta = bs * self.verify_rows, self.attn.capture_metadata("verify", bs, self.verify_rows)

            def verify(t=t, meta=meta):
                with forward_context(meta):
                    hidden = model(self.input_ids[:t], self.positions[:t])
                    return model.compute_logits(hidden[self.verify_logit_rows[:t]]), hidden
            replay, out, pool = self._capture(verify, pool)
            self.verify[bs] = (replay, out)
        self.attn.reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def fits_decode(self, batch: InputBatch, num_scheduled: int) -> bool:
        """Every scheduled sequence is a sampling decode and the batch fits the largest graph."""
        return (bool(self.decode) and batch.attn_metadata.num_decodes == num_scheduled
                and batch.logits_indices.shape[0] == num_scheduled and num_scheduled <= self.max_decode_bs)

    def fits_verify(self, batch: InputBatch, num_scheduled: int) -> bool:
        """A speculative verify (more logits rows than sequences) of 2 ≤ B ≤ the largest bucket
        sequences of at most ``verify_rows`` tokens each; decodes and short prefill chunks may
        ride along. Decided from the packed inputs only (what every tensor-parallel rank has)."""
        return (bool(self.verify) and 2 <= num_scheduled <= self.verify_sizes[-1]
                and batch.logits_indices.shape[0] > num_scheduled
                and batch.attn_metadata.max_query_len <= self.verify_rows)

    def replay_verify(self, batch: InputBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [rows, V], hidden [n, H]), static outputs as for ``replay_decode``."""
        n, b = batch.input_ids.shape[0], batch.attn_metadata.num_seqs
        bs = next(s for s in self.verify_sizes if s >= b)
        replay, (logits, hidden) = self.verify[bs]
        self._copy_tokens(batch, n)
        self.attn.prepare_replay("verify", bs, batch.attn_metadata, self.verify_rows)
        rows = batch.logits_indices.shape[0]
        self.verify_logit_rows[:rows].copy_(batch.logits_indices)
        self.verify_logit_rows[rows:bs * self.verify_rows].zero_()
        replay()
        return logits[:rows], hidden[:n]

    def prefill_bucket(self, num_tokens: int) -> int | None:
        return next((t for t in sorted(self.prefill) if t >= num_tokens), None)

    def replay_decode(self, batch: InputBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [n, V], hidden [n, H]); both are the graph's static outputs, valid until the
        next replay."""
        n = batch.input_ids.shape[0]
        bs = next(b for b in sorted(self.decode) if b >= n)
        replay, (logits, hidden) = self.decode[bs]
        self._copy_tokens(batch, n)
        self.attn.prepare_replay("decode", bs, batch.attn_metadata)
        replay()
        return logits[:n], hidden[:n]

    def replay_prefill(self, batch: InputBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [rows, V], hidden [n, H]), static outputs as for ``replay_decode``."""
        n = batch.input_ids.shape[0]
        t = self.prefill_bucket(n)
        replay, (logits, hidden) = self.prefill[t]
        self._copy_tokens(batch, n)
        self.attn.prepare_replay("prefill", t, batch.attn_metadata)
        rows = batch.logits_indices.shape[0]
        self.logit_rows[:rows].copy_(batch.logits_indices)
        self.logit_rows[rows:].zero_()  # stale rows of a larger bucket could index past this one
        replay()
        self.attn.after_replay("prefill")
        return logits[:rows], hidden[:n]

    def _copy_tokens(self, batch: InputBatch, n: int) -> None:
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
