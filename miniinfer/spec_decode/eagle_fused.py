"""A whole EAGLE-2 speculative step as one tensor program: one CUDA graph replay, one host read.

The host path (``eagle.py`` + the runner's verify) costs ~3 ms of Python a step on the GPU
machine for ~1 ms of kernels (``benchmarks/spec_step_phases.py``): the catch-up's inputs, the
tree read, the verify's packing, the draws read, the accept walk and the KV compaction each
wait on the host. For greedy sequences without logprobs, penalties, logit bias or grammars,
this module runs, per sequence of a batch bucket (1, 2, 4 … 32 rows):

1. **catch-up**: the head over the ``cu_n`` ≤ D + 1 tokens since its cache was valid (the last
   step's committed tokens, from position ``start``), fed the target features of the positions
   before them; padding rows write no K/V. The root's output is the last real row's;
2. **tree**: ``StaticTreeDrafter.program`` (EAGLE-2 expansion and rerank), laid out breadth-first
   as ``eagle_tree.trees_from_rerank`` does (same node order, so the same K/V layout as the host
   path);
3. **verify**: the target over the root token and the N nodes, tree-masked, its LM head on every
   row, greedy draws;
4. **accept**: the longest path whose every token equals its parent's draw (children of a node
   carry distinct tokens, so greedy acceptance is a chain); committed tokens = the draws along
   it (the accepted drafts, then the bonus token);
5. **compaction**: the accepted nodes' K/V moved to consecutive positions (``ModelRunner.
   _compact_accepted_kv``'s move, on the device);
6. **next inputs**: the committed tokens, their count, the features at the accepted rows and the
   new ``start`` go back into the input buffers, so a next step over the same rows restages only
   the block tables and depth budgets.

Outputs: one int64 tensor [B, 2R + 2N + 2] (R = D + 1: committed tokens, count, path offsets,
node tokens, node parents, valid nodes) copied to pinned memory; ``collect`` reads it once.
The result is the host path's (same ops, same layout; ``tests/spec_decode/test_eagle_fused.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from miniinfer.attention.metadata import TREE_WINDOW, AttentionMetadata, forward_context
from miniinfer.engine.step import InFlightStep, StepResult
from miniinfer.sampling_params import GREEDY_TEMPERATURE
from miniinfer.spec_decode.eagle import EagleState
from miniinfer.spec_decode.eagle_tree_static import GRAPH_BATCH_SIZES, _pow2_window, device_slots


@dataclass
class FusedOutputs:
    """Host view of one fused step, per live row."""
    committed: list[list[int]]  # the accepted drafts, then the bonus token
    paths: list[list[int]]  # offsets among the verified rows (0 = the root), one per committed token
    drafts: list[list[int]]  # the tree's valid nodes' tokens (breadth-first) ...
    parents: list[list[int]]  # ... and their parents (node index, -1 = the root)


class FusedEagleStep:
    """Static buffers for up to ``max_batch`` rows (≤ 32), a graph per bucket after ``capture``."""

    def __init__(self, drafter, runner, max_batch: int, max_blocks: int):
        cfg = drafter.config
        self.drafter, self.runner = drafter, runner
        self.static = drafter.static
        self.D, self.K = cfg.num_speculative_tokens, cfg.eagle_topk
        self.R = self.D + 1
        pool = self.K + (self.D - 1) * self.K * self.K
        self.N = min(cfg.max_draft_tokens, pool)  # the rerank's width
        self.block_size = drafter.block_size
        self.max_seq_len = drafter.max_model_len
        dev = self.device = drafter.head.device
        B = self.max_batch = min(max_batch, GRAPH_BATCH_SIZES[-1])
        i64 = dict(dtype=torch.int64, device=dev)
        self.cu_tok = torch.zeros(B, self.R, **i64)
        self.cu_feat = torch.zeros(B, self.R, drafter.hidden_size, dtype=drafter.head.dtype, device=dev)
        self.cu_n = torch.ones(B, **i64)
        self.start = torch.ones(B, **i64)
        self.depth_limit = torch.full((B,), self.D, **i64)
        self.live = torch.zeros(B, dtype=torch.bool, device=dev)
        self.block_tables = torch.zeros(B, max_blocks, dtype=torch.int32, device=dev)
        self.pow2 = _pow2_window(dev)
        self.graphs: dict[int, tuple] = {}  # bucket -> (replay, packed outputs [b, 2R + 2N + 2])

    @property
    def out_width(self) -> int:
        return 2 * self.R + 2 * self.N + 2

    # --- the tensor program ------------------------------------------------------------
    def _slots(self, tables: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return device_slots(tables, kv, self.block_size)

    def _meta(self, B: int, q: int, seq_lens: torch.Tensor, tables: torch.Tensor, slots: torch.Tensor,
              tree_mask: torch.Tensor | None = None) -> AttentionMetadata:
        qsl = torch.arange(0, B * q + 1, q, dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(num_decodes=0, num_decode_tokens=0, query_start_loc=qsl,
                                 seq_lens=seq_lens.to(torch.int32), block_tables=tables, slot_mapping=slots.reshape(-1),
                                 max_query_len=q, max_seq_len=self.max_seq_len, tree_mask=tree_mask)
        if not slots.is_cuda:  # the CPU paths loop over host lists
            meta.query_start_loc_cpu, meta.seq_lens_cpu = qsl.tolist(), meta.seq_lens.tolist()
            meta.tree_mask_cpu = tree_mask.tolist() if tree_mask is not None else None
        return meta

    def _tree(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``rerank_device``'s [5, B, N] → breadth-first (tokens, parents, depths, valid) [B, N]
        (``trees_from_rerank``'s order: by pool index; invalid nodes last, token kept)."""
        idx, tok, par, dep, fin = packed.unbind(0)
        order = torch.where(fin.bool(), idx, idx + (1 << 40)).argsort(dim=1)
        idx, tok, par, dep, fin = (x.gather(1, order) for x in (idx, tok, par, dep, fin))
        match = (par[:, :, None] == idx[:, None, :]) & fin.bool()[:, None, :]
        parent = torch.where(par < 0, -1, match.to(torch.int32).argmax(-1).to(torch.int64))
        valid = fin.bool() & ((par < 0) | match.any(-1))
        for _ in range(self.D - 1):  # a node whose parent was dropped goes, with its subtree
            valid = valid & torch.where(parent < 0, True, valid.gather(1, parent.clamp(min=0)))
        return tok, parent, dep, valid

    def program(self, B: int) -> torch.Tensor:
        d_, R, D, dev = self.drafter, self.R, self.D, self.device
        target = self.runner.model
        tables, live, n = self.block_tables[:B], self.live[:B], self.cu_n[:B]
        start = self.start[:B]
        P = start + n  # tokens known
        # 1. catch-up
        j = torch.arange(R, device=dev)
        pos = start[:, None] + j
        real = (j < n[:, None]) & live[:, None]
        slots = torch.where(real, self._slots(tables, pos), -1)
        with forward_context(self._meta(B, R, start + R, tables, slots)):
            h = d_.head(target.embed(self.cu_tok[:B].reshape(-1)), self.cu_feat[:B].reshape(B * R, -1), pos.reshape(-1))
        root_h = h.view(B, R, -1).gather(1, (n - 1)[:, None, None].expand(B, 1, h.shape[-1])).squeeze(1)
        # 2. tree
        packed = self.static.program(B, P, tables, live, root_h, None, self.depth_limit[:B])
        tok, parent, dep, valid = self._tree(packed)
        N = tok.shape[1]
        # 3. verify: the root (KV index P - 1) and node i at P + i, positions P - 1 + depth
        root_tok = self.cu_tok[:B].gather(1, (n - 1)[:, None])
        ids = torch.cat([root_tok, tok], 1)
        vpos = (P - 1)[:, None] + torch.cat([torch.zeros_like(root_tok), dep], 1)
        kv = (P - 1)[:, None] + torch.arange(N + 1, device=dev)
        vslots = torch.where(live[:, None], self._slots(tables, kv), -1)
        rows = torch.cat([torch.full_like(root_tok, -1), parent], 1) + 1  # parent row (root: itself)
        vis = torch.eye(N + 1, dtype=torch.bool, device=dev).expand(B, N + 1, N + 1)
        for _ in range(D):  # ancestors-or-self, through the parents
            vis = vis | vis.gather(1, rows[:, :, None].expand(B, N + 1, N + 1))
        prefix = (1 << (TREE_WINDOW - N - 1)) - 1
        mask = prefix + (vis.to(torch.int64) * self.pow2[TREE_WINDOW - N - 1:]).sum(-1)
        with forward_context(self._meta(B, N + 1, P + N, tables, vslots, mask.reshape(-1))):
            hidden = target(ids.reshape(-1), vpos.reshape(-1))
        draws = target.compute_logits(hidden).argmax(-1).view(B, N + 1)
        # 4. accept: a node is accepted when its parent is and its token is the parent's draw
        acc = torch.zeros(B, N, dtype=torch.bool, device=dev)
        tok_ok = valid & (tok == draws.gather(1, parent + 1))
        for _ in range(D):
            acc = tok_ok & torch.where(parent < 0, True, acc.gather(1, parent.clamp(min=0)))
        a = (acc * dep).amax(1)  # accepted drafts
        at_depth = acc[:, None, :] & (dep[:, None, :] == torch.arange(1, D + 1, device=dev)[None, :, None])
        path = torch.cat([torch.zeros_like(root_tok),
                          torch.where(at_depth.any(-1), at_depth.to(torch.int32).argmax(-1) + 1, 0)], 1)  # [B, R]
        committed = draws.gather(1, path)
        count = a + 1
        # 5. compaction: path node j's K/V to KV index P - 1 + j (no-op entries: row 0's root onto itself)
        on_path = (j[None, :] <= a[:, None]) & (path != j[None, :]) & live[:, None]
        src = torch.where(on_path, self._slots(tables, (P - 1)[:, None] + path), -1)
        dst = torch.where(on_path, self._slots(tables, (P - 1)[:, None] + j), -1)
        noop = vslots[0, 0]
        src, dst = torch.where(src < 0, noop, src).reshape(-1), torch.where(dst < 0, noop, dst).reshape(-1)
        flat = self.runner.kv_caches.flatten(2, 3)
        if flat.element_size() == 1:
            flat = flat.view(torch.uint8)
        flat[:, :, dst] = flat[:, :, src]
        # 6. the next step's catch-up inputs
        feats = hidden.view(B, N + 1, -1).gather(1, path[:, :, None].expand(B, R, hidden.shape[-1]))
        self.cu_feat[:B].copy_(feats)
        self.cu_tok[:B].copy_(committed)
        self.cu_n[:B].copy_(count)
        self.start[:B].copy_(P)
        return torch.cat([committed, count[:, None], path, tok, parent, valid.sum(1, keepdim=True)], 1)

    # --- running it --------------------------------------------------------------------
    def bucket(self, B: int) -> int | None:
        if self.device.type != "cuda":
            return B if B <= self.max_batch else None
        return next((b for b in sorted(self.graphs) if b >= B), None)

    def capture(self, max_batch: int) -> None:
        """One graph per bucket of ``GRAPH_BATCH_SIZES`` up to ``max_batch`` (CUDA only)."""
        if self.device.type != "cuda":
            return
        pool = None
        for b in sorted((b for b in GRAPH_BATCH_SIZES if b <= min(max_batch, self.max_batch)), reverse=True):
            self.live[:b].fill_(False)
            self.start[:b].fill_(1)
            self.cu_n[:b].fill_(1)
            with torch.inference_mode():
                self.program(b)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.program(b)
            pool = graph.pool() if pool is None else pool
            self.graphs[b] = (graph.replay, out)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, B: int) -> torch.Tensor:
        """The program over the staged rows ``:B`` (a graph replay on CUDA); [B, out_width] int64."""
        bucket = self.bucket(B)
        if bucket in self.graphs:
            self.live[B:bucket].fill_(False)
            replay, out = self.graphs[bucket]
            replay()
            return out[:B]
        return self.program(B)

    @staticmethod
    def unpack(host: list[list[int]], R: int, N: int) -> FusedOutputs:
        out = FusedOutputs([], [], [], [])
        for row in host:
            c = row[R]
            nodes = row[2 * R + 2 * N + 1]
            out.committed.append(row[:c])
            out.paths.append(row[R + 1:R + 1 + c])
            out.drafts.append(row[2 * R + 1:2 * R + 1 + nodes])
            out.parents.append(row[2 * R + 1 + N:2 * R + 1 + N + nodes])
        return out


class FusedEagleDriver:
    """The engine's side of the fused step: which steps it serves, their staging, launch and
    collection. ``EagleDrafter.propose_for`` calls :meth:`stage`; the engine then asks
    :meth:`claim` whether the scheduled step is the one staged, and launches it through
    :meth:`launch` (``InFlightStep.collect_with`` = :meth:`collect`)."""

    def __init__(self, drafter, engine):
        self.drafter = drafter
        self.engine = engine
        self.step = FusedEagleStep(drafter, engine.runner, engine.config.max_num_seqs,
                                   drafter.static.block_tables.shape[1])
        self.enabled = engine.runner.device.type == "cuda"  # on the CPU: tests switch it on
        self.rows: list | None = None  # the sequences staged for the next step, in row order
        self.gen = 0  # fused steps collected; a row's buffers are current when its mark says so
        self._last_B = 0
        self._staged: list[int] | None = None  # depth budgets, table width and tables last copied
        self._feats: torch.Tensor | None = None  # the last launch's accepted rows' features
        dev = self.step.device
        self._host = (torch.empty(self.step.max_batch, self.step.out_width, dtype=torch.int64, pin_memory=True)
                      if dev.type == "cuda" else None)

    def fusable(self, seq, k: int) -> bool:
        p, st = seq.params, seq.spec_state
        if (k < 1 or not isinstance(st, EagleState) or st.num_preemptions != seq.num_preemptions
                or p.temperature >= GREEDY_TEMPERATURE or p.logprobs is not None or p.logit_bias
                or seq.grammar is not None):
            return False
        return 1 <= seq.num_tokens - min(st.valid, seq.num_tokens - 1) <= self.step.R

    @torch.inference_mode()
    def stage(self, running: list, ks: list[int]) -> bool:
        """Stage the fused step for all of ``running`` when every one qualifies (and nothing
        waits to be admitted); their ``spec_token_ids`` become N placeholders. False: not
        this step (the host path drafts)."""
        s_, d_ = self.step, self.drafter
        B = len(running)
        if not self.enabled or not B or self.engine.scheduler.waiting or s_.bucket(B) is None:
            return False
        if not all(self.fusable(seq, k) for seq, k in zip(running, ks)):
            return False
        room = max(s_.N, (s_.D - 1) * s_.K)  # the tree's head K/V and the verify's nodes
        for seq in running:
            full = seq.num_tokens + room
            if full > d_.max_model_len or not d_.kv.allocate(seq.block_table, full):
                return False
        fast = B == self._last_B and all(seq.spec_state.fused_mark == (self.gen, b, seq.num_tokens)
                                         for b, seq in enumerate(running))
        width = min(max(len(seq.block_table) for seq in running), s_.block_tables.shape[1])
        tables: list[int] = []
        for seq in running:
            t = seq.block_table[:width]
            tables += t + [0] * (width - len(t))
        head = list(ks) + [width] + tables  # what the buffers already hold when unchanged: no copy
        if fast and head == self._staged:
            self._mark_placeholders(running)
            return True
        flat = list(ks)
        if not fast:
            starts = [min(seq.spec_state.valid, seq.num_tokens - 1) for seq in running]
            flat += starts + [seq.num_tokens - st for seq, st in zip(running, starts)]
            for seq, st in zip(running, starts):
                toks = seq.token_ids[st:]
                flat += toks + [0] * (s_.R - len(toks))
        dev = d_.staging.to_device(flat + tables, torch.int64)
        d_.staging.end_step()
        s_.depth_limit[:B].copy_(dev[:B])
        at = B
        if not fast:
            s_.start[:B].copy_(dev[at:at + B])
            s_.cu_n[:B].copy_(dev[at + B:at + 2 * B])
            s_.cu_tok[:B].copy_(dev[at + 2 * B:at + 2 * B + B * s_.R].view(B, s_.R))
            at += 2 * B + B * s_.R
            for b, (seq, st) in enumerate(zip(running, starts)):
                s_.cu_feat[b, :seq.num_tokens - st].copy_(d_._features(seq.spec_state, st, seq.num_tokens))
        s_.block_tables[:B, :width].copy_(dev[at:].view(B, width))
        s_.live[:B].fill_(True)
        self._staged = head
        self._mark_placeholders(running)
        return True

    def _mark_placeholders(self, running: list) -> None:
        N = self.step.N
        for seq in running:
            seq.spec_token_ids = [0] * N
            seq.spec_parents = list(range(-1, N - 1))
        self.rows = list(running)

    def claim(self, sched) -> bool:
        """Whether ``sched`` is the staged step (every staged row a verify of N placeholders,
        nothing else). If not, the placeholder rows become plain decodes."""
        rows, self.rows = self.rows, None
        if rows is None:
            return False
        for seq in rows:  # placeholders of rows the scheduler did not reach (it pops the others)
            seq.spec_token_ids, seq.spec_parents = [], None
        N = self.step.N
        if (not sched.preempted and len(sched.scheduled) == len(rows)
                and all(s.seq is seq and len(s.draft_token_ids) == N for s, seq in zip(sched.scheduled, rows))):
            return True
        staged = {id(seq) for seq in rows}
        for s in sched.scheduled:
            if id(s.seq) in staged and s.draft_token_ids:
                s.seq.num_computed_tokens -= len(s.draft_token_ids)
                s.num_new_tokens, s.draft_token_ids, s.draft_parents = 1, [], None
        sched.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        return False

    @torch.inference_mode()
    def launch(self, sched):
        """Replay the step for the claimed ``sched``; its outputs start copying to the host."""
        B = len(sched.scheduled)
        out = self.step.run(B)
        self._feats = self.step.cu_feat[:B].clone()  # the accepted rows' features (kept by each sequence)
        event = None
        host = out
        if out.is_cuda:  # (synchronous steps: one pinned buffer is enough)
            host = self._host[:B]
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return InFlightStep(sched, [s.seq for s in sched.scheduled], out, host, event, None,
                            collect_with=self.collect)

    @torch.inference_mode()
    def collect(self, step):
        """Wait for the step's outputs → ``StepResult`` (committed tokens and paths); each row's
        drafts become its real tree, its head state the one the program left."""
        if step.event is not None:
            step.event.synchronize()
        s_ = self.step
        o = FusedEagleStep.unpack(step.token_ids_host.tolist(), s_.R, s_.N)
        self.gen += 1
        self._last_B = len(step.sched.scheduled)
        for b, (s, c) in enumerate(zip(step.sched.scheduled, o.committed)):
            s.draft_token_ids, s.draft_parents = o.drafts[b], (o.parents[b] if s_.K > 1 else None)
            seq = s.seq
            seq.num_computed_tokens = s.start + len(c)  # the root and the accepted drafts
            st, P = seq.spec_state, s.start + 1  # tokens known before the step (num_tokens holds a placeholder now)
            st.valid, st.feat_start, st.feats = P, P - 1, [self._feats[b, :len(c)]]
            st.fused_mark = (self.gen, b, P + len(c))
        rows = [b * (s_.N + 1) for b in range(len(o.committed))]
        return StepResult([c[0] for c in o.committed], None, o.committed, rows, spec_paths=o.paths)
