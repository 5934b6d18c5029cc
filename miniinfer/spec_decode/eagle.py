"""EAGLE drafting: a one-layer head over the target's final hidden states proposes a chain of
tokens (Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", 2024).

The head (``eagle_head.py``) predicts the target's next feature from the current token's
embedding and the previous feature; the target's LM head turns the prediction into a draft.

Per sequence (``seq.spec_state``: an :class:`EagleState`):

* after every target step, ``record`` keeps the target's features f_p of the positions the
  step computed for good (a prefill chunk, a decode, or a verify's last token + accepted drafts);
* ``draft`` runs the head over the positions since its cache was last valid (catch-up with the
  true features f_{p−1}; the root's output comes from the last row), then grows a draft tree
  from it (``eagle_tree.py``: EAGLE-2's top-``eagle_topk`` expansion and rerank; with
  ``eagle_topk`` = 1 a greedy chain of k − 1 further steps feeding its own output back). The
  drafts are deterministic (the rejection sampler treats each as a point mass). The head's
  cache is valid through the last known token afterwards: what it wrote for the drafts came
  from its own features, so those positions are recomputed on the next catch-up.

Like the draft model, the head's one-layer K/V cache has the target's block count and uses
the target's block tables. A position whose previous feature is missing (the token before a
prefix-cache hit, or position 0) gets a zero feature, as in training.
"""
from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field

import torch

from miniinfer.attention.metadata import forward_context
from miniinfer.engine.sequence import Sequence
from miniinfer.engine.step import ScheduledSeq, SchedulerOutput, StepResult
from miniinfer.spec_decode.config import SpeculativeConfig
from miniinfer.spec_decode.eagle_tree import grow_trees
from miniinfer.spec_decode.proposer import Proposer
from miniinfer.worker.host_staging import PinnedStaging
from miniinfer.worker.input_batch import InputBatch, prepare_inputs

HEADS_DIR = os.path.join(os.path.dirname(__file__), "heads")
EMBEDDED_HEAD = os.path.join(HEADS_DIR, "smollm2-135m-instruct-eagle.safetensors")


@dataclass
class EagleState:
    num_preemptions: int
    valid: int  # the head's K/V is valid below this position
    feat_start: int  # position of the first kept target feature
    feats: list[torch.Tensor] = field(default_factory=list)  # [n_i, H] each, consecutive positions
    fused_mark: tuple | None = None  # (fused step, row, num_tokens) whose buffers hold its next inputs

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
        self.runner = runner
        self.vocab_size = engine.model_config.vocab_size
        self.grammar_aware = True  # mask the head's proposals with each request's grammar
        # ... at every depth (grow_trees: a host walk per depth), or the root's children only
        # (the static tree program; on CUDA by default: one graph replay instead of D host steps)
        self.grammar_all_depths = runner.device.type != "cuda"
        self._grammar_mask = None
        self.graphs = None
        from miniinfer.spec_decode.eagle_tree_static import StaticTreeDrafter
        self.static = StaticTreeDrafter(self, engine.config.max_num_seqs, -(-engine.max_model_len // self.block_size))
        self.fused = None  # the whole step as one program (eagle_fused.py); MINIINFER_SPEC_FUSED=0: off
        if not runner.tp.enabled and os.environ.get("MINIINFER_SPEC_FUSED", "1") != "0":
            from miniinfer.spec_decode.eagle_fused_driver import FusedEagleDriver
            self.fused = FusedEagleDriver(self, engine)
        if runner.device.type == "cuda" and not engine.config.enforce_eager:
            self.capture_cuda_graphs(engine)
            self.static.capture(engine.config.max_num_seqs)
            if self.fused is not None:
                # the constrained steps' three graphs too, when structured output can be used
                self.fused.step.capture(engine.config.max_num_seqs, split=importlib.util.find_spec("xgrammar") is not None)

    def _draft_vocab(self, path: str, engine) -> None:
        """Frequency-ranked drafting (Zhao et al., "FR-Spec", 2025): the head's logits over the
        most frequent tokens only (``draft_vocab`` in the head's JSON sidecar, plus the stop
        tokens), so a draft step reads a slice of the LM head. Without the list: all tokens."""
        import json
        self.vocab_ids = self.vocab_w = self.vocab_q8 = None
        sidecar = path.removesuffix(".safetensors") + ".json"
        if not os.path.isfile(sidecar):
            return
        with open(sidecar) as f:
            ids = json.load(f).get("draft_vocab")
        if not ids:
            return
        lm = self.target.lm_head
        if self.target.tp.enabled or (lm is not None and not _plain_matrix(getattr(lm, "weight", None))):
            return  # a sharded or quantized untied LM head: full logits
        ids = sorted(set(ids) | set(engine.eos_token_ids))
        self.vocab_ids = torch.tensor(ids, dtype=torch.int64, device=self.head.device)
        with torch.inference_mode():  # tied: the embedding's rows (dequantized when it is quantized)
            rows = self.target.embed(self.vocab_ids) if lm is None else lm.weight[self.vocab_ids]
        self.vocab_w = rows.to(self.head.dtype).contiguous()  # [Vd, H]
        from miniinfer.models.packed_linear import QuantizedLinear
        if isinstance(self.head.fc, QuantizedLinear):  # the head went Q8_0 (CPU): so does this
            pad = -self.vocab_w.shape[0] % 16  # the kernels take whole 16-row records
            self.vocab_q8 = QuantizedLinear.from_dense(torch.nn.functional.pad(self.vocab_w, (0, 0, 0, pad)))

    def top_tokens(self, h: torch.Tensor, k: int, allowed: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head outputs ``h`` [n, H] → their top ``k`` draft tokens: (log-probabilities
        [n, k] float32 over the draft vocabulary, token ids [n, k] int64). ``allowed`` [n, Vd]
        bool (any device): only those tokens, renormalized over them (a row allowing none gets
        -inf scores). On CPU the draft vocabulary's rows are a Q8_0 C GEMM (``vocab_q8``, rows
        padded to 16) once the head is."""
        if self.vocab_w is None:
            logits = self.target.compute_logits(h)
        elif self.vocab_q8 is not None:
            logits = self.vocab_q8(h.float())[:, :self.vocab_w.shape[0]]
        else:
            logits = h.to(self.vocab_w.dtype) @ self.vocab_w.t()
        logits = logits.float()
        if allowed is None:
            logp = logits.log_softmax(-1)
        else:  # renormalized over the allowed tokens; a row allowing none: all -inf
            logits = logits.masked_fill(~allowed.to(logits.device, non_blocking=True), float("-inf"))
            logp = logits.log_softmax(-1).nan_to_num(nan=float("-inf"), neginf=float("-inf"))
        values, indices = topk_rows(logp, k)
        ids = indices if self.vocab_ids is None else self.vocab_ids[indices]
        return values, ids

    def grammar_mask(self) -> "GrammarDraftMask | None":
        """The grammar-aware drafting masks (``grammar_draft.py``) once the engine has a
        structured-output manager and ``grammar_aware`` is on (the default; off: the A/B)."""
        manager = self.runner.structured_output
        if not self.grammar_aware or manager is None:
            return None
        if self._grammar_mask is None or self._grammar_mask.manager is not manager:
            from miniinfer.spec_decode.grammar_draft import GrammarDraftMask
            width = self.vocab_w.shape[0] if self.vocab_w is not None else self.vocab_size
            self._grammar_mask = GrammarDraftMask(manager, self.vocab_ids, width)
        return self._grammar_mask

    # --- features from the target ------------------------------------------------------
    def record(self, sched: SchedulerOutput, result: StepResult, verify_time_s: float | None = None) -> None:
        if result.spec_token_ids is not None:
            super().record(sched, result, verify_time_s)
        if result.hidden is None:
            return
        paths = iter(result.spec_paths or [])
        offset = 0
        for s in sched.scheduled:
            n, seq = s.num_new_tokens, s.seq
            rows = result.hidden[offset:offset + n]
            if s.samples and result.spec_paths is not None:
                path = next(paths)  # the last token and the accepted drafts
                if s.draft_token_ids:
                    rows = rows[:len(path)] if path[-1] == len(path) - 1 else rows[torch.tensor(path, device=rows.device)]
            if not seq.is_finished:
                self._keep(seq, s.start, rows)
            offset += n

    def _keep(self, seq: Sequence, start: int, feats: torch.Tensor) -> None:
        st = seq.spec_state
        if st is None or st.num_preemptions != seq.num_preemptions or start < st.valid - 1:
            st = seq.spec_state = EagleState(seq.num_preemptions, valid=start, feat_start=start)
        if not st.feats or st.feat_end != start:
            st.feats, st.feat_start = [], start  # a gap: the missing features read as zeros
        st.feats.append(feats.clone())  # graph outputs are static buffers

    # --- drafting ----------------------------------------------------------------------
    def propose_for(self, running: list[Sequence]) -> None:
        """The fused step when every running sequence qualifies (``eagle_fused.py``), else drafts."""
        limit = self.config.disable_by_batch_size
        if self.fused is not None and running and (limit is None or len(running) <= limit):
            t0 = time.perf_counter()
            if self.fused.stage(running, [self.budget(s) for s in running]):
                self.count_draft_step(running, time.perf_counter() - t0)  # staging only: drafting runs in the step
                return
        super().propose_for(running)

    def claim(self, sched: SchedulerOutput) -> bool:
        return self.fused is not None and self.fused.claim(sched)

    def launch(self, sched: SchedulerOutput):
        return self.fused.launch(sched)

    def run_ahead(self, prev):
        if self.fused is None:
            return None
        t0 = time.perf_counter()
        finish = self.fused.run_ahead(prev)
        if finish is not None:
            self.count_draft_step(prev.sampling_seqs, time.perf_counter() - t0)
        return finish

    def draft(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """Drafts per sequence (a chain, or with ``eagle_topk`` > 1 a tree whose parents go to
        ``seq.spec_parents``); none for a sequence without kept features or cache room."""
        topk, D = self.config.eagle_topk, self.config.num_speculative_tokens
        live = []
        for s, k in zip(seqs, ks):
            if not isinstance(s.spec_state, EagleState):
                continue
            nodes = min(self.config.max_draft_tokens, k) if topk == 1 else self.config.max_draft_tokens
            full = s.num_tokens + max(nodes, (D - 1) * topk)  # the static program's head steps: depth D
            need = s.num_tokens + max(nodes, (k - 1) * topk)
            if self.static is not None and full <= self.max_model_len and self.kv.allocate(s.block_table, full):
                live.append((s, k, nodes))
            elif need <= self.max_model_len and self.kv.allocate(s.block_table, need):
                live.append((s, k, nodes))
        out = {id(s): [] for s in seqs}
        if live:
            self._run(live, out)
        return [out[id(s)] for s in seqs]

    @torch.inference_mode()
    def _run(self, live: list[tuple[Sequence, int, int]], out: dict[int, list[int]]) -> None:
        views, feats = [], {}
        for seq, _, _ in live:
            st = seq.spec_state
            start = min(st.valid, seq.num_tokens - 1)
            view = Sequence(seq.request_id, seq.index, list(seq.token_ids), seq.num_prompt_tokens, seq.params)
            view.block_table = seq.block_table
            views.append(ScheduledSeq(view, view.num_tokens - start, start))
            feats[id(view)] = self._features(st, start, view.num_tokens)
        sched = SchedulerOutput(sorted(views, key=lambda s: s.num_new_tokens != 1))
        owner = {id(v.seq): item for v, item in zip(views, live)}
        batch, _, _ = prepare_inputs(sched, self.block_size, self.staging)  # the catch-up
        h = self.head_forward(batch, len(sched.scheduled),
                              torch.cat([feats[id(s.seq)] for s in sched.scheduled]))[batch.logits_indices]
        order = [owner[id(s.seq)] for s in sched.scheduled]
        seqs = [seq for seq, _, _ in order]
        if self._static_fits(order):
            grammar = self.grammar_mask()  # the root's children among what each grammar allows
            rows = grammar.rows(seqs, [[[]] for _ in seqs]) if grammar is not None else None
            allowed = grammar.expand(rows[:, 0], h.device) if rows is not None else None
            trees = self.static.grow([s.block_table for s in seqs], [s.num_tokens for s in seqs], h, allowed,
                                     depths=[k for _, k, _ in order], num_nodes=[n for _, _, n in order])
        else:
            trees = grow_trees(self, seqs, [k for _, k, _ in order], [n for _, _, n in order], h)
        for (seq, _, _), tree in zip(order, trees):
            out[id(seq)] = tree.tokens
            seq.spec_parents = tree.parents if self.config.eagle_topk > 1 else None
            st = seq.spec_state  # valid through the last known token; f of it arrives with the verify
            st.valid = seq.num_tokens
            st.feats, st.feat_start = [], seq.num_tokens - 1

    def _static_fits(self, order: list[tuple[Sequence, int, int]]) -> bool:
        """The static tree program (``eagle_tree_static.py``) serves this step: every sequence
        has cache room for the full depth D (its tree is cut to its own budget afterwards), and
        no constrained sequence wants its drafts masked at every depth (``grammar_all_depths``:
        ``grow_trees``' host walk per depth); the static program masks the root's children only."""
        if self.static is None:
            return False
        D, K = self.config.num_speculative_tokens, self.config.eagle_topk
        if any(len(s.block_table) * self.block_size < s.num_tokens + (D - 1) * K for s, _, _ in order):
            return False  # no cache room for the full depth (near max_model_len)
        return not (self.grammar_all_depths and self.grammar_mask() is not None
                    and any(s.grammar is not None for s, _, _ in order))

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

    def head_forward(self, batch: InputBatch, num_seqs: int, features: torch.Tensor) -> torch.Tensor:
        """The head over ``batch`` (``features`` [T, H]: f of each row's previous position);
        returns its outputs [T, H] (a graph's static buffer: use before the next replay). A
        decode graph when the rows are one-token decodes, a prefill graph for one sequence's
        rows (a tree step's mask rides in the graph's buffers), else eager."""
        g = self.graphs
        T = batch.input_ids.shape[0]
        if g is not None and (g.fits_decode(batch, num_seqs) or (num_seqs == 1 and g.prefill_bucket(T))):
            self._graph_model.features[:T].copy_(features)
            if g.fits_decode(batch, num_seqs):
                return g.replay_decode(batch)[1]
            return g.replay_prefill(batch)[1]
        with forward_context(batch.attn_metadata):
            return self.head(self.target.embed(batch.input_ids), features, batch.positions)


def topk_rows(x: torch.Tensor, k: int, chunk: int = 128, two_stage: bool | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=-1)`` for x [n, V] (values, indices, best first). On CUDA in two stages:
    the top k of each ``chunk`` columns, then the top k of those: torch's one-block-per-row
    radix select over a draft vocabulary of ~8k columns took ~46 µs a call on the H200, the two
    stages a few µs each (``benchmarks/spec_step_phases.py``). The same set of values; the
    order of exact ties may differ. ``two_stage``: default on CUDA only."""
    n, V = x.shape
    if not (x.is_cuda if two_stage is None else two_stage) or V <= 4 * chunk or k > chunk:
        top = x.topk(k, dim=-1)
        return top.values, top.indices
    pad = -V % chunk
    xp = torch.nn.functional.pad(x, (0, pad), value=float("-inf")) if pad else x
    first = xp.view(n, -1, chunk).topk(k, dim=-1)  # [n, V / chunk, k]
    second = first.values.view(n, -1).topk(k, dim=-1)  # [n, k] over the V / chunk × k candidates
    cand = second.indices
    col = first.indices.view(n, -1).gather(1, cand) + (cand // k) * chunk
    return second.values, col


def _plain_matrix(w) -> bool:
    return isinstance(w, torch.Tensor) and w.dim() == 2


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
