"""The engine's side of the fused EAGLE step (``eagle_fused.py``): which steps it serves, their
staging, launch and collection, and for constrained sequences (issue #14) the grammar's part.

Constrained steps run the step as three graphs (``FusedEagleStep.run_split``)::

    host:    stage (root rows) │ draft │ verify │ wait tree ─ walk trees, fill rows ─ copy │ accept │ ... collect
    device:                    │ draft ┼ tree ↓ ┼──────────── verify ────────────────────┤ mask + accept

The tree goes to pinned memory behind the draft; the verify is queued before the host waits
for it, so each constrained sequence's tree is walked through its matcher (xgrammar's
``traverse_draft_tree``, one row per node) while the verify runs; the rows go up non-blocking
and only the accept waits for them. ``StructuredOutputManager.overlap`` off: the verify is
queued after the fill (the serial baseline). The matchers move only in ``collect``'s
processing, by the committed tokens, once (``output_processor``).
"""
from __future__ import annotations

import torch

from miniinfer.engine.step import InFlightStep, ScheduledSeq, SchedulerOutput, StepResult
from miniinfer.sampling_params import GREEDY_TEMPERATURE
from miniinfer.spec_decode.eagle import EagleState
from miniinfer.spec_decode.eagle_fused import FusedEagleStep


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
        # overlap scheduling: step N + 1 queued before step N is processed (``run_ahead``)
        self.run_ahead_enabled = engine.config.overlap_scheduling
        self.num_run_ahead = 0  # steps queued that way
        self._ahead_open = False  # one queued whose host half (``finish``) has not run yet
        dev = self.step.device
        pin = dev.type == "cuda"
        # the outputs' pinned copies, two: step N + 1's copy may be queued before N's is read
        self._hosts = [torch.empty(self.step.max_batch, self.step.out_width, dtype=torch.int64, pin_memory=pin)
                       for _ in range(2)]
        self._turn = 0
        self.constrained: list[int] = []  # the staged rows with a grammar (their steps run split)
        self._mask_host = torch.empty(self.step.bitmask.shape, dtype=torch.int32, pin_memory=pin)
        self._root_host = torch.empty(self.step.max_batch, self.step.mask_width, dtype=torch.int32, pin_memory=pin)
        self._root_copied: torch.cuda.Event | None = None  # its last copy to the device

    def fusable(self, seq, k: int) -> bool:
        p, st = seq.params, seq.spec_state
        if (k < 1 or not isinstance(st, EagleState) or st.num_preemptions != seq.num_preemptions
                or p.temperature >= GREEDY_TEMPERATURE or p.logprobs is not None or p.logit_bias):
            return False
        if seq.grammar is not None and (not seq.grammar_active or self.drafter.grammar_all_depths):
            return False  # (masks at every drafting depth: the host path's walk per depth)
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
        fast = not self._ahead_open and B == self._last_B and all(seq.spec_state.fused_mark == (self.gen, b, seq.num_tokens)
                                         for b, seq in enumerate(running))
        width, tables = self._tables(running)
        self._ahead_open = False
        head = list(ks) + [width] + tables  # what the buffers already hold when unchanged: no copy
        if fast and head == self._staged:
            self._finish_stage(running)
            return True
        flat = list(ks)
        if not fast:
            starts = [min(seq.spec_state.valid, seq.num_tokens - 1) for seq in running]
            flat += starts + [seq.num_tokens - st for seq, st in zip(running, starts)]
            for seq, st in zip(running, starts):
                toks = seq.token_ids[st:]
                flat += toks + [0] * (s_.R - len(toks))
        d_.staging.begin_step()  # (the other arena: its copies are done, nothing is in flight now)
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
        self._finish_stage(running)
        return True

    def _tables(self, rows: list) -> tuple[int, list[int]]:
        """The rows' block tables as the device buffer holds them: (width, flat table ids)."""
        width = min(max(len(seq.block_table) for seq in rows), self.step.block_tables.shape[1])
        tables: list[int] = []
        for seq in rows:
            t = seq.block_table[:width]
            tables += t + [0] * (width - len(t))
        return width, tables

    def _finish_stage(self, running: list) -> None:
        """The staged rows' grammar part, then N placeholder drafts each (the scheduler allocates for them)."""
        self._stage_grammar(running)
        N = self.step.N
        for seq in running:
            seq.spec_token_ids = [0] * N
            seq.spec_parents = list(range(-1, N - 1))
        self.rows = list(running)

    def _stage_grammar(self, running: list) -> None:
        """Grammar-aware drafting: the root's children among what each grammar allows now
        (``static.root_allowed``, from each matcher's next-token row in pinned memory; all True
        when no row is constrained or ``grammar_aware`` is off)."""
        self.constrained = [b for b, seq in enumerate(running) if seq.grammar is not None]
        mask = self.drafter.grammar_mask() if self.constrained else None
        allowed = None
        if mask is not None:
            if self._root_copied is not None:  # (a staged step that never ran: its copy may be pending)
                self._root_copied.synchronize()
            host = self._root_host[:len(running)]
            host.fill_(-1)
            manager = self.engine.runner.structured_output  # (many rows: on its fill threads)
            manager.fill_rows([running[b].grammar for b in self.constrained], host, self.constrained)
            allowed = mask.expand(host, self.step.device)
            if host.is_pinned():
                self._root_copied = torch.cuda.Event()
                self._root_copied.record()
        self.drafter.static.set_root_allowed(len(running), allowed)

    def _fill(self, seqs: list, tree: torch.Tensor) -> torch.Tensor:
        """The verify's bitmask rows [B (N + 1), W] int32 (pinned on CUDA) for the drafted trees
        ``tree`` [B, 2N + 1] int64 (host; ``FusedEagleStep.split_parts``): each constrained
        sequence's tree walked through its matcher (``StructuredOutputManager.fill_trees``), -1 elsewhere."""
        N, t = self.step.N, tree.tolist()
        trees = []  # (matcher, tokens, parents, first row) per live constrained sequence
        for b in self.constrained:
            if seqs[b].grammar_active and not seqs[b].is_finished:
                n = t[b][2 * N]
                trees.append((seqs[b].grammar, t[b][:n], t[b][N:N + n], b * (N + 1)))
        host = self._mask_host[:len(seqs) * (N + 1)]
        self.engine.runner.structured_output.fill_trees(host, trees)
        return host

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
        if self.constrained:
            seqs = [s.seq for s in sched.scheduled]
            started = self.step.start_split(B, self.engine.runner.structured_output.overlap)
            return self._in_flight(sched, self._copy_out(self.step.finish_split(started, lambda tree: self._fill(seqs, tree))))
        return self._in_flight(sched, self._copy_out(self.step.run(B)))

    def _copy_out(self, out: torch.Tensor) -> tuple:
        """Right behind the step on the stream: its outputs [B, out_width] on their way to
        pinned memory and the accepted rows' features (the program's buffer, which the next
        step overwrites) cloned → (outputs, their host copy, its event, features)."""
        feats = self.step.cu_feat[:out.shape[0]].clone()
        event = None
        host = out
        if out.is_cuda:
            self._turn ^= 1
            host = self._hosts[self._turn][:out.shape[0]]
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return out, host, event, feats

    def _in_flight(self, sched, copied: tuple) -> InFlightStep:
        out, host, event, feats = copied
        return InFlightStep(sched, [s.seq for s in sched.scheduled], out, host, event, None,
                            hidden=feats, collect_with=self.collect)

    @torch.inference_mode()
    def collect(self, step):
        """Wait for the step's outputs → ``StepResult`` (committed tokens and paths); each row's
        drafts become its real tree, its head state the one the program left. Rows finished
        while the step ran (a step queued ahead: ``run_ahead``) are dropped."""
        if step.event is not None:
            step.event.synchronize()
        s_ = self.step
        o = FusedEagleStep.unpack(step.token_ids_host.tolist(), s_.R, s_.N)
        self.gen += 1
        self._last_B = len(step.sched.scheduled)
        for b, (s, c) in enumerate(zip(step.sched.scheduled, o.committed)):
            seq = s.seq
            if seq.is_finished:
                s.draft_token_ids, s.draft_parents = [], None  # (not counted in the acceptance stats)
                continue
            s.draft_token_ids, s.draft_parents = o.drafts[b], (o.parents[b] if s_.K > 1 else None)
            seq.num_computed_tokens = s.start + len(c)  # the root and the accepted drafts
            st, P = seq.spec_state, s.start + 1  # tokens known before the step (num_tokens holds a placeholder now)
            st.valid, st.feat_start, st.feats = P, P - 1, [step.hidden[b, :len(c)]]
            st.fused_mark = (self.gen, b, P + len(c))
        rows = [b * (s_.N + 1) for b in range(len(o.committed))]
        return StepResult([c[0] for c in o.committed], None, o.committed, rows, spec_paths=o.paths)

    # --- overlap scheduling: the next step queued before this one is processed --------------
    @torch.inference_mode()
    def run_ahead(self, prev: InFlightStep):
        """Queue step N + 1 over ``prev``'s rows before the host processes step N (``prev``):
        the program left N + 1's inputs in its buffers, so only grown block tables and depth
        budgets cut for ``max_tokens`` go up. While the device runs N + 1's draft and verify,
        the host processes N (detokenizes, checks stops, advances the matchers); the returned
        ``finish()`` then builds N + 1's
        ``SchedulerOutput`` from the processed state, and for constrained rows fills the verify's
        rows and queues the accept (``FusedEagleStep.start_split / finish_split``). Rows that N
        finishes are computed and dropped (``collect``). None: not this step (another kind of
        step in flight, a request waiting or gone, a row short of cache or length)."""
        eng, s_, d_ = self.engine, self.step, self.drafter
        rows = prev.sampling_seqs
        if (not self.run_ahead_enabled or prev.collect_with != self.collect or eng.scheduler.waiting
                or eng.scheduler.running != rows or any(seq.is_finished for seq in rows)):
            return None
        B, room = len(rows), max(s_.N, (s_.D - 1) * s_.K) + s_.R  # step N may commit R tokens first
        ks = []  # depth budgets that hold whatever N commits (Proposer.budget after R more tokens)
        for b, seq in enumerate(rows):
            k = self._staged[b]
            if seq.params.max_tokens is not None:
                k = min(k, seq.params.max_tokens - seq.num_output_tokens - s_.R - 1)
            full = seq.num_tokens + room
            if k < 1 or full > d_.max_model_len or not d_.kv.allocate(seq.block_table, full):
                return None  # (near the end: the synchronous step stages the exact budgets)
            ks.append(k)
        width, tables = self._tables(rows)
        head = ks + [width] + tables
        if head != self._staged:  # a budget moved or a table grew: up they go (queued after step N)
            d_.staging.begin_step()
            dev = d_.staging.to_device(ks + tables, torch.int64)
            d_.staging.end_step()
            s_.depth_limit[:B].copy_(dev[:B])
            s_.block_tables[:B, :width].copy_(dev[B:].view(B, width))
            self._staged = head
        self._ahead_open = True
        self.num_run_ahead += 1
        if self.constrained:
            d_.static.set_root_allowed(B, None)  # (the root rows would need N's tokens in the matchers)
            started = s_.start_split(B, eng.runner.structured_output.overlap)
        else:
            copied = self._copy_out(s_.run(B))

        def finish() -> InFlightStep:
            sched = self._ahead_sched(rows)
            done = (self._copy_out(s_.finish_split(started, lambda tree: self._fill(rows, tree)))
                    if self.constrained else copied)
            self._ahead_open = False
            return self._in_flight(sched, done)
        return finish

    def _ahead_sched(self, rows: list) -> SchedulerOutput:
        """Step N + 1's ``SchedulerOutput`` once N is processed: each row a verify of N
        placeholder drafts from its last token (as ``stage`` + the scheduler would make it)."""
        N, sched = self.step.N, SchedulerOutput()
        for seq in rows:
            s = ScheduledSeq(seq, 1 + N, seq.num_computed_tokens, [0] * N, list(range(-1, N - 1)))
            s.samples = True  # (a row N finished samples too: its draws are dropped)
            if not seq.is_finished:
                assert seq.num_computed_tokens == seq.num_tokens - 1 and not seq.num_pending, seq
                seq.num_computed_tokens += 1 + N
            sched.scheduled.append(s)
        return sched
