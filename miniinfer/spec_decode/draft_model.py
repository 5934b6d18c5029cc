"""Drafting with a smaller model that shares the target's tokenizer.

The draft model has its own K/V tensors but no block manager of its own: its cache has as
many blocks as the target's and each sequence uses the target's ``block_table``, so the draft
K/V of position p sits at the same slot as the target's. Before drafting, the proposer
allocates the target blocks the verify will need anyway (positions up to L + k − 1).

Per step and drafting sequence (L known tokens, the draft cache valid up to ``c``): one
forward over tokens[c:L] (catch-up: the prompt the first time, later the tokens the last
verify committed), then k − 1 single-token decodes, each greedy (a deterministic draft: the
rejection sampler treats it as a point mass). Draft K/V written for drafts the target
rejects stays behind the valid mark and is overwritten later; shared prefix pages only ever
receive the K/V of the same tokens at the same positions, so writing them again is harmless.
"""
from __future__ import annotations

import dataclasses

import torch

from miniinfer.engine.sequence import Sequence
from miniinfer.engine.step import ScheduledSeq, SchedulerOutput, StepResult
from miniinfer.spec_decode.config import SpeculativeConfig
from miniinfer.spec_decode.proposer import Proposer, verified


class DraftModelDrafter(Proposer):
    def __init__(self, config: SpeculativeConfig, engine):
        super().__init__(config, engine.max_model_len)
        from miniinfer.config import ModelConfig
        from miniinfer.loader.model_loader import resolve_model
        from miniinfer.worker.model_runner import ModelRunner
        target = engine.config
        draft_cfg = dataclasses.replace(
            target, model=config.model, tokenizer=None, load_format="auto", speculative_config=None,
            num_kv_blocks=engine.kv.num_blocks, enforce_eager=True, warmup=False, tensor_parallel_size=1)
        source = resolve_model(draft_cfg)
        self.model_config = ModelConfig.from_hf_dict(source.hf_config)
        if self.model_config.vocab_size > engine.model_config.vocab_size:
            raise ValueError(f"speculative_config.model's vocabulary ({self.model_config.vocab_size}) is larger "
                             f"than the target's ({engine.model_config.vocab_size}): they must share a tokenizer")
        self.runner = ModelRunner(draft_cfg, self.model_config, source, engine.max_model_len, progress=False)
        self.kv = engine.kv

    def draft(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        live = []
        for seq, k in zip(seqs, ks):  # the verify's blocks, now (no blocks: no drafts this step)
            if self.kv.allocate(seq.block_table, seq.num_tokens + k):
                live.append((seq, k))
        out: dict[int, list[int]] = {id(s): [] for s in seqs}
        if live:
            self._run(live, out)
        return [out[id(s)] for s in seqs]

    @torch.inference_mode()
    def _run(self, live: list[tuple[Sequence, int]], out: dict[int, list[int]]) -> None:
        views = []
        for seq, _ in live:
            # spec_state: (num_preemptions, draft K/V valid below this position)
            pre, valid = seq.spec_state or (-1, 0)
            if pre != seq.num_preemptions:  # new, or its blocks were freed: recompute from 0
                valid = 0
            valid = min(valid, seq.num_tokens - 1)
            view = Sequence(seq.request_id, seq.index, list(seq.token_ids), seq.num_prompt_tokens, seq.params)
            view.block_table = seq.block_table
            views.append((view, valid))
        sched = SchedulerOutput([ScheduledSeq(v, v.num_tokens - c, c) for v, c in views])
        sched.scheduled.sort(key=lambda s: s.num_new_tokens != 1)  # the backends want decodes first
        order = [s.seq for s in sched.scheduled]
        tokens = self._greedy(sched)
        k_max = max(k for _, k in live)
        by_view = {id(v): (seq, k) for (v, _), (seq, k) in zip(views, live)}
        for step in range(k_max):
            active = []
            for v, t in zip(order, tokens):
                seq, k = by_view[id(v)]
                out[id(seq)].append(t)
                if len(out[id(seq)]) < k:
                    v.token_ids.append(t)
                    active.append(v)
            if not active:
                break
            sched = SchedulerOutput([ScheduledSeq(v, 1, v.num_tokens - 1) for v in active])
            order = active
            tokens = self._greedy(sched)
        for seq, _ in live:
            seq.spec_state = (seq.num_preemptions, seq.num_tokens)  # every known token; see record

    def record(self, sched: SchedulerOutput, result: StepResult, verify_time_s: float | None = None) -> None:
        """Also: the drafts the target accepted were fed to the draft model (all but the
        last): their draft K/V is valid too."""
        super().record(sched, result, verify_time_s)
        for s, tokens in verified(sched, result):
            if s.draft_token_ids and s.seq.spec_state is not None:
                pre, valid = s.seq.spec_state
                fed = len(s.draft_token_ids) - 1
                s.seq.spec_state = (pre, valid + min(len(tokens) - 1, fed))

    def _greedy(self, sched: SchedulerOutput) -> list[int]:
        fwd = self.runner.forward(sched, None)
        return fwd.logits.argmax(-1).tolist()
