"""EAGLE drafting: a one-layer head over the target's final hidden states proposes a chain of
tokens (Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", 2024).

The head (``eagle_head.py``) predicts the target's next feature from the current token's
embedding and the previous feature; the target's LM head turns the prediction into a draft.

Per sequence (``seq.spec_state``: an :class:`EagleState`):

* after every target step, ``record`` keeps the target's features f_p of the positions the
  step computed for good (a prefill chunk, a decode, or a verify's last token + accepted drafts);
* ``draft`` runs the head over the positions since its cache was last valid (catch-up with the
  true features f_{p−1}; the first draft comes from the last row), then k − 1 steps feeding its
  own output back, greedy (a deterministic draft: the rejection sampler treats it as a point
  mass). The head's cache is valid through the last known token afterwards: what it wrote for
  the drafts came from its own features, so those positions are recomputed on the next catch-up.

Like the draft model, the head's one-layer K/V cache has the target's block count and uses
the target's block tables. A position whose previous feature is missing (the token before a
prefix-cache hit, or position 0) gets a zero feature, as in training. This is EAGLE's chain
mode; EAGLE-2's dynamic tree (``eagle_topk`` > 1) needs tree attention in the verify.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from miniinfer.attention.metadata import forward_context
from miniinfer.engine.sequence import Sequence
from miniinfer.engine.step import ScheduledSeq, SchedulerOutput, StepResult
from miniinfer.spec_decode.config import SpeculativeConfig
from miniinfer.spec_decode.proposer import Proposer
from miniinfer.worker.host_staging import PinnedStaging
from miniinfer.worker.input_batch import prepare_inputs

HEADS_DIR = os.path.join(os.path.dirname(__file__), "heads")
EMBEDDED_HEAD = os.path.join(HEADS_DIR, "smollm2-135m-instruct-eagle.safetensors")


@dataclass
class EagleState:
    num_preemptions: int
    valid: int  # the head's K/V is valid below this position
    feat_start: int  # position of the first kept target feature
    feats: list[torch.Tensor] = field(default_factory=list)  # [n_i, H] each, consecutive positions

    @property
    def feat_end(self) -> int:
        return self.feat_start + sum(f.shape[0] for f in self.feats)


def default_head_path(engine) -> str:
    """The shipped head when the target is the embedded SmolLM2; else ``ValueError``."""
    from miniinfer.loader.embedded import embedded_model_path
    model = engine.config.model
    try:
        embedded = model is None or os.path.abspath(model) == embedded_model_path()
    except FileNotFoundError:
        embedded = False
    if not embedded:
        raise ValueError("speculative_config.model (an EAGLE head file) is required: the shipped head "
                         "fits the embedded SmolLM2 only")
    return EMBEDDED_HEAD


class EagleDrafter(Proposer):
    def __init__(self, config: SpeculativeConfig, engine):
        super().__init__(config, engine.max_model_len)
        from miniinfer.spec_decode.eagle_head import EagleHead
        runner = engine.runner
        self.target = runner.model
        self.head = EagleHead(engine.model_config, runner.backend, engine.max_model_len, runner.device,
                              runner.dtype)
        path = config.model or default_head_path(engine)
        self.head.load(path)
        self._draft_vocab(path, engine)
        self.head.allocate_kv_cache(engine.kv.num_blocks, engine.kv.block_size)
        self.kv = engine.kv
        self.block_size = engine.kv.block_size
        self.staging = PinnedStaging(runner.device)
        self.hidden_size = engine.model_config.hidden_size
        runner.keep_hidden = True
        self.graphs = None
        if runner.device.type == "cuda" and not engine.config.enforce_eager:
            self.capture_cuda_graphs(engine)

    def _draft_vocab(self, path: str, engine) -> None:
        """Frequency-ranked drafting (Zhao et al., "FR-Spec", 2025): the head's logits over the
        most frequent tokens only (``draft_vocab`` in the head's JSON sidecar, plus the stop
        tokens), so a draft step reads a slice of the LM head. Without the list: all tokens."""
        import json
        self.vocab_ids = self.vocab_w = None
        sidecar = path.removesuffix(".safetensors") + ".json"
        if not os.path.isfile(sidecar):
            return
        with open(sidecar) as f:
            ids = json.load(f).get("draft_vocab")
        if not ids:
            return
        lm = self.target.lm_head
        weight = self.target.embed_tokens.weight if lm is None else getattr(lm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or self.target.tp.enabled:
            return  # a quantized untied head: full logits
        ids = sorted(set(ids) | set(engine.eos_token_ids))
        self.vocab_ids = torch.tensor(ids, dtype=torch.int64, device=weight.device)
        self.vocab_w = weight[self.vocab_ids].to(self.head.dtype).contiguous()  # [Vd, H]

    def _argmax(self, h: torch.Tensor) -> list[int]:
        if self.vocab_w is None:
            return self.target.compute_logits(h).argmax(-1).tolist()
        return self.vocab_ids[(h.to(self.vocab_w.dtype) @ self.vocab_w.t()).argmax(-1)].tolist()

    # --- features from the target ------------------------------------------------------
    def record(self, sched: SchedulerOutput, result: StepResult) -> None:
        if result.spec_token_ids is not None:
            super().record(sched, result)
        if result.hidden is None:
            return
        committed = iter(result.spec_token_ids or [])
        offset = 0
        for s in sched.scheduled:
            n, seq = s.num_new_tokens, s.seq
            used = n
            if s.samples and result.spec_token_ids is not None:
                tokens = next(committed)
                if s.draft_token_ids:  # the last token and the accepted drafts
                    used = len(tokens)
            if not seq.is_finished:
                self._keep(seq, s.start, result.hidden[offset:offset + used])
            offset += n

    def _keep(self, seq: Sequence, start: int, feats: torch.Tensor) -> None:
        st = seq.spec_state
        if st is None or st.num_preemptions != seq.num_preemptions or start < st.valid - 1:
            st = seq.spec_state = EagleState(seq.num_preemptions, valid=start, feat_start=start)
        if not st.feats or st.feat_end != start:
            st.feats, st.feat_start = [], start  # a gap: the missing features read as zeros
        st.feats.append(feats.clone())  # graph outputs are static buffers

    # --- drafting ----------------------------------------------------------------------
    def draft(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        live = [(s, k) for s, k in zip(seqs, ks)
                if isinstance(s.spec_state, EagleState) and self.kv.allocate(s.block_table, s.num_tokens + k)]
        out = {id(s): [] for s in seqs}
        if live:
            self._run(live, out)
        return [out[id(s)] for s in seqs]

    @torch.inference_mode()
    def _run(self, live: list[tuple[Sequence, int]], out: dict[int, list[int]]) -> None:
        views, feats = [], {}
        for seq, _ in live:
            st = seq.spec_state
            start = min(st.valid, seq.num_tokens - 1)
            view = Sequence(seq.request_id, seq.index, list(seq.token_ids), seq.num_prompt_tokens, seq.params)
            view.block_table = seq.block_table
            views.append(ScheduledSeq(view, view.num_tokens - start, start))
            feats[id(view)] = self._features(st, start, view.num_tokens)
        sched = SchedulerOutput(sorted(views, key=lambda s: s.num_new_tokens != 1))
        owner = {id(v.seq): (seq, k) for v, (seq, k) in zip(views, live)}
        tokens, h = self._head_step(sched, torch.cat([feats[id(s.seq)] for s in sched.scheduled]))
        for depth in range(max(k for _, k in live)):
            nxt, rows = [], []
            for row, (s, t) in enumerate(zip(sched.scheduled, tokens)):
                seq, k = owner[id(s.seq)]
                out[id(seq)].append(t)
                if len(out[id(seq)]) < k:
                    s.seq.token_ids.append(t)
                    nxt.append(ScheduledSeq(s.seq, 1, s.seq.num_tokens - 1))
                    rows.append(row)
            if not nxt:
                break
            sched = SchedulerOutput(nxt)
            tokens, h = self._head_step(sched, h[rows])
        for seq, _ in live:  # valid through the last known token; f of it arrives with the verify
            st = seq.spec_state
            st.valid = seq.num_tokens
            st.feats, st.feat_start = [], seq.num_tokens - 1

    def _features(self, st: EagleState, start: int, end: int) -> torch.Tensor:
        """f_{p−1} for p in [start, end): kept target features, zeros where none is kept."""
        x = torch.zeros(end - start, self.hidden_size, dtype=self.head.dtype, device=self.head.device)
        if st.feats:
            kept = torch.cat(st.feats)
            lo, hi = max(start - 1, st.feat_start), min(end - 1, st.feat_end)
            if hi > lo:
                x[lo + 1 - start:hi + 1 - start] = kept[lo - st.feat_start:hi - st.feat_start]
        return x

    def capture_cuda_graphs(self, engine) -> None:
        """Graphs of the head steps (the target's two families, ``worker/cuda_graphs.py``): B
        sequences × 1 token for the draft steps, one sequence's catch-up of up to 2048 tokens."""
        from miniinfer.worker.cuda_graphs import CUDAGraphs
        self._graph_model = _GraphedHead(self, max(engine.config.max_num_seqs, 2048))
        self.graphs = CUDAGraphs(self._graph_model, self.head.backend, engine.config.max_num_seqs,
                                 engine.max_model_len, self.block_size, self.head.device)
        self.graphs.capture()

    def _head_step(self, sched: SchedulerOutput, features: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """One head forward over ``sched`` (rows in its order); returns the greedy draft of each
        sequence's last row and the head's outputs of those rows [B, H]."""
        batch, _, _ = prepare_inputs(sched, self.block_size, self.staging)
        g, n = self.graphs, len(sched.scheduled)
        if g is not None and (g.fits_decode(batch, n) or (n == 1 and g.prefill_bucket(batch.input_ids.shape[0]))):
            self._graph_model.features[:features.shape[0]].copy_(features)
            if g.fits_decode(batch, n):
                _, h = g.replay_decode(batch)
            else:
                _, h = g.replay_prefill(batch)
        else:
            with forward_context(batch.attn_metadata):
                h = self.head(self.target.embed(batch.input_ids), features, batch.positions)
        last = h[batch.logits_indices]
        return self._argmax(last), last


class _GraphedHead(torch.nn.Module):
    """The head as ``CUDAGraphs`` wants a model: ``forward(input_ids, positions)``, the features
    in a static buffer filled before each replay, and ``compute_logits`` (not used: the
    drafter takes the argmax over its draft vocabulary from the returned hidden states)."""

    def __init__(self, drafter: EagleDrafter, max_tokens: int):
        super().__init__()
        self.drafter = drafter
        self.features = torch.zeros(max_tokens, drafter.hidden_size, dtype=drafter.head.dtype,
                                    device=drafter.head.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        d = self.drafter
        return d.head(d.target.embed(input_ids), self.features[:input_ids.shape[0]], positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, :1]
