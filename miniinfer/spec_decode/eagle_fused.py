"""A whole EAGLE-2 speculative step as one tensor program: one CUDA graph replay, one host read.

The host path (``eagle.py`` + the runner's verify) costs ~3 ms of Python a step on the GPU
machine for ~1 ms of kernels (``benchmarks/spec_step_phases.py``): the catch-up's inputs, the
tree read, the verify's packing, the draws read, the accept walk and the KV compaction each
wait on the host. For greedy sequences without logprobs, penalties or logit bias,
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

Constrained sequences (issue #14) take the same ops as three parts (``split_parts``: draft, verify,
masked accept; three graphs per bucket when xgrammar is installed): the drafted tree goes to the
host between the first two, the host fills one bitmask row per node while the verify runs, and
only the accept's draws (masked by ``bitmask``) wait for the rows (``run_split``;
``eagle_fused_driver.py`` drives it).

Outputs: one int64 tensor [B, 2R + 2N + 2] (R = D + 1: committed tokens, count, path offsets,
node tokens, node parents, valid nodes) copied to pinned memory; ``collect`` reads it once.
The result is the host path's (same ops, same layout; ``tests/spec_decode/test_eagle_fused.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from miniinfer.attention.metadata import TREE_WINDOW, AttentionMetadata, forward_context
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
        # constrained steps (``run_split``): the verify's bitmask rows, one per node, and the tree read
        self.mask_width = -(-drafter.vocab_size // 32)  # int32 words per row (xgrammar's layout)
        self.bitmask = torch.full((B * (self.N + 1), self.mask_width), -1, dtype=torch.int32, device=dev)
        self.split: dict[int, tuple] = {}  # bucket -> (draft replay, tree [b, 2N + 1]), verify replay, (accept replay, out)
        self._unpack: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._tree_host = (torch.empty(B, 2 * self.N + 1, dtype=torch.int64, pin_memory=True)
                           if dev.type == "cuda" else None)

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

    def _draft(self, B: int, root_allowed: torch.Tensor | None = None) -> dict:
        """Steps 1-2: the catch-up and the tree → the step's tensors (``_verify``/``_accept`` take them)."""
        d_, R, dev = self.drafter, self.R, self.device
        tables, live, n = self.block_tables[:B], self.live[:B], self.cu_n[:B]
        start = self.start[:B]
        P = start + n  # tokens known
        j = torch.arange(R, device=dev)
        pos = start[:, None] + j
        real = (j < n[:, None]) & live[:, None]
        slots = torch.where(real, self._slots(tables, pos), -1)
        with forward_context(self._meta(B, R, start + R, tables, slots)):
            h = d_.head(self.runner.model.embed(self.cu_tok[:B].reshape(-1)), self.cu_feat[:B].reshape(B * R, -1),
                        pos.reshape(-1))
        root_h = h.view(B, R, -1).gather(1, (n - 1)[:, None, None].expand(B, 1, h.shape[-1])).squeeze(1)
        packed = self.static.program(B, P, tables, live, root_h, root_allowed, self.depth_limit[:B])
        tok, parent, dep, valid = self._tree(packed)
        return dict(P=P, n=n, live=live, tables=tables, tok=tok, parent=parent, dep=dep, valid=valid,
                    root_tok=self.cu_tok[:B].gather(1, (n - 1)[:, None]))

    def _verify(self, B: int, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: the target over the root token (KV index P - 1) and node i (at P + i, position
        P - 1 + depth), tree-masked → (hidden [B (N + 1), H], logits [B (N + 1), V])."""
        D, N, dev = self.D, self.N, self.device
        P, root_tok, parent, tables = t["P"], t["root_tok"], t["parent"], t["tables"]
        ids = torch.cat([root_tok, t["tok"]], 1)
        vpos = (P - 1)[:, None] + torch.cat([torch.zeros_like(root_tok), t["dep"]], 1)
        kv = (P - 1)[:, None] + torch.arange(N + 1, device=dev)
        t["vslots"] = vslots = torch.where(t["live"][:, None], self._slots(tables, kv), -1)
        rows = torch.cat([torch.full_like(root_tok, -1), parent], 1) + 1  # parent row (root: itself)
        vis = torch.eye(N + 1, dtype=torch.bool, device=dev).expand(B, N + 1, N + 1)
        for _ in range(D):  # ancestors-or-self, through the parents
            vis = vis | vis.gather(1, rows[:, :, None].expand(B, N + 1, N + 1))
        prefix = (1 << (TREE_WINDOW - N - 1)) - 1
        mask = prefix + (vis.to(torch.int64) * self.pow2[TREE_WINDOW - N - 1:]).sum(-1)
        with forward_context(self._meta(B, N + 1, P + N, tables, vslots, mask.reshape(-1))):
            hidden = self.runner.model(ids.reshape(-1), vpos.reshape(-1))
        return hidden, self.runner.model.compute_logits(hidden)

    def _accept(self, B: int, t: dict, hidden: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Steps 4-6 from the rows' draws [B, N + 1] → the packed outputs [B, out_width]."""
        R, D, N, dev = self.R, self.D, self.N, self.device
        P, tok, parent, dep, valid, live = t["P"], t["tok"], t["parent"], t["dep"], t["valid"], t["live"]
        # 4. accept: a node is accepted when its parent is and its token is the parent's draw
        acc = torch.zeros(B, N, dtype=torch.bool, device=dev)
        tok_ok = valid & (tok == draws.gather(1, parent + 1))
        for _ in range(D):
            acc = tok_ok & torch.where(parent < 0, True, acc.gather(1, parent.clamp(min=0)))
        a = (acc * dep).amax(1)  # accepted drafts
        at_depth = acc[:, None, :] & (dep[:, None, :] == torch.arange(1, D + 1, device=dev)[None, :, None])
        zero = torch.zeros_like(t["root_tok"])
        path = torch.cat([zero, torch.where(at_depth.any(-1), at_depth.to(torch.int32).argmax(-1) + 1, 0)], 1)  # [B, R]
        committed = draws.gather(1, path)
        count = a + 1
        # 5. compaction: path node j's K/V to KV index P - 1 + j (no-op entries: row 0's root onto itself)
        j = torch.arange(R, device=dev)
        on_path = (j[None, :] <= a[:, None]) & (path != j[None, :]) & live[:, None]
        src = torch.where(on_path, self._slots(t["tables"], (P - 1)[:, None] + path), -1)
        dst = torch.where(on_path, self._slots(t["tables"], (P - 1)[:, None] + j), -1)
        noop = t["vslots"][0, 0]
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

    def program(self, B: int) -> torch.Tensor:
        """The whole step over rows ``:B``, unconstrained → [B, out_width] int64."""
        t = self._draft(B)
        hidden, logits = self._verify(B, t)
        return self._accept(B, t, hidden, logits.argmax(-1).view(B, self.N + 1))

    # --- constrained steps: the draft, the verify and the accept as three parts -------------
    def _masked_draws(self, B: int, logits: torch.Tensor) -> torch.Tensor:
        """Greedy draws [B, N + 1] of the verify's logits under ``bitmask``'s rows (bit set =
        allowed; columns past the mask's 32 W stay as they are, as xgrammar's apply leaves them).
        Unpacked per byte (little-endian words: token t is bit t % 8 of byte t // 8), so the
        temporaries are [B (N + 1), V] uint8 / bool."""
        V = logits.shape[-1]
        if self._unpack is None or self._unpack[0].shape[0] != V:
            col = torch.arange(V, device=self.device)
            past = col >= 32 * self.mask_width if V > 32 * self.mask_width else None
            self._unpack = ((col // 8).clamp(max=4 * self.mask_width - 1), (col % 8).to(torch.uint8), past)
        byte, bit, past = self._unpack
        rows = self.bitmask[:B * (self.N + 1)].view(torch.uint8)
        forbidden = ((rows[:, byte] >> bit) & 1) == 0
        if past is not None:
            forbidden &= ~past
        return logits.masked_fill(forbidden, float("-inf")).argmax(-1).view(B, self.N + 1)

    def split_parts(self, B: int) -> tuple:
        """(draft, verify, accept) over rows ``:B``: draft → the tree [B, 2N + 1] int64 (tokens,
        parents, valid count; the root's children among ``static.root_allowed``), verify → the
        logits kept for accept, accept → the packed outputs with the draws masked by ``bitmask``."""
        state: dict = {}

        def draft() -> torch.Tensor:
            t = state["t"] = self._draft(B, self.static.root_allowed[:B])
            return torch.cat([t["tok"], t["parent"], t["valid"].sum(1, keepdim=True)], 1)

        def verify() -> None:
            state["hidden"], state["logits"] = self._verify(B, state["t"])

        def accept() -> torch.Tensor:
            return self._accept(B, state["t"], state["hidden"], self._masked_draws(B, state["logits"]))
        return draft, verify, accept

    @torch.inference_mode()
    def run_split(self, B: int, fill, overlap: bool = True) -> torch.Tensor:
        """A step with constrained rows → [B, out_width] int64. ``fill(tree)`` gets the tree
        [B, 2N + 1] int64 on the host and returns the bitmask rows [B (N + 1), mask_width] int32
        (pinned on CUDA; -1 rows for unconstrained sequences). With ``overlap`` the verify is
        queued before the host waits for the tree, so the fill runs beside it and only the
        accept waits for the rows; without, the verify waits for the fill (the serial baseline)."""
        return self.finish_split(self.start_split(B, overlap), fill)

    @torch.inference_mode()
    def start_split(self, B: int, overlap: bool = True) -> tuple:
        """The first half of ``run_split``: the draft queued, its tree on its way to the host,
        and with ``overlap`` the verify queued behind it. The host may do other work (process
        the previous step, advancing the matchers the fill reads) before ``finish_split``."""
        bucket = next((b for b in sorted(self.split) if b >= B), None)
        if bucket is None:  # eager (the CPU; CUDA without the split graphs)
            draft, verify, accept = self.split_parts(B)
            tree = draft().cpu()
            if overlap:
                verify()
            return B, overlap, tree, None, (verify, accept, None)
        self._pad(B, bucket)
        (draft, tree), verify, (accept, out) = self.split[bucket]
        draft()
        host = self._tree_host[:B]
        host.copy_(tree[:B], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        if overlap:
            verify()
        return B, overlap, host, ready, (verify, accept, out)

    @torch.inference_mode()
    def finish_split(self, started: tuple, fill) -> torch.Tensor:
        """The second half: wait for the tree, ``fill`` its rows, copy them up, queue the
        accept (after the verify, when it was not queued yet) → [B, out_width] int64."""
        B, overlap, tree, ready, (verify, accept, out) = started
        if ready is not None:
            ready.synchronize()
        self.bitmask[:B * (self.N + 1)].copy_(fill(tree), non_blocking=True)
        if not overlap:
            verify()
        result = accept()
        return result if out is None else out[:B]

    def _pad(self, B: int, bucket: int) -> None:
        """Rows ``B:bucket`` of a replay are padding: no K/V written, and their inputs reset, as
        at capture (each replay advances every row's ``start``: a row left padding for long
        would otherwise walk its positions past the tables and the RoPE cache)."""
        if bucket > B:
            self.live[B:bucket].fill_(False)
            self.start[B:bucket].fill_(1)
            self.cu_n[B:bucket].fill_(1)

    # --- running it --------------------------------------------------------------------
    def bucket(self, B: int) -> int | None:
        if self.device.type != "cuda":
            return B if B <= self.max_batch else None
        return next((b for b in sorted(self.graphs) if b >= B), None)

    def capture(self, max_batch: int, split: bool = False) -> None:
        """One graph per bucket of ``GRAPH_BATCH_SIZES`` up to ``max_batch`` (CUDA only); with
        ``split`` also the three graphs of ``split_parts`` per bucket (constrained steps)."""
        if self.device.type != "cuda":
            return
        # All graphs share one memory pool: a step replays one bucket's graphs only, in order
        # (program, or draft → verify → accept), and the tensors one part hands the next stay
        # referenced (``split_parts``' state), so no replay overwrites what another still reads.
        pool = None
        for b in sorted((b for b in GRAPH_BATCH_SIZES if b <= min(max_batch, self.max_batch)), reverse=True):
            self.live[:b].fill_(False)
            self.start[:b].fill_(1)
            self.cu_n[:b].fill_(1)
            with torch.inference_mode():
                parts = [lambda b=b: self.program(b)]
                if split:
                    parts += self.split_parts(b)
                outs = []
                for part in parts:  # each warmed up, captured, then replayed: the next part reads its outputs
                    part()
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        outs.append((graph.replay, part()))
                    graph.replay()
                    pool = graph.pool() if pool is None else pool
            self.graphs[b] = outs[0]
            if split:
                self.split[b] = (outs[1], outs[2][0], outs[3])
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, B: int) -> torch.Tensor:
        """The program over the staged rows ``:B`` (a graph replay on CUDA); [B, out_width] int64."""
        bucket = self.bucket(B)
        if bucket in self.graphs:
            self._pad(B, bucket)
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
