"""Grammar compilation, per-sequence matchers and the per-step bitmask (xgrammar >= 0.2).

Reference: Dong et al., "XGrammar: Flexible and Efficient Structured Generation Engine for
Large Language Models" (2024) — a pushdown automaton over the grammar with a token-mask
cache, so filling one row of the ``[B, ceil(V / 32)]`` int32 bitmask takes microseconds.
"""
from __future__ import annotations

import collections
import functools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from miniinfer.errors import InvalidRequestError
from miniinfer.sampling_params import StructuredOutputsParams
from miniinfer.structured_output.fill_pool import FillPool, fill_threads
from miniinfer.structured_output.step_job import GrammarStepJob

MAX_GRAMMAR_BYTES = 64 * 1024  # a schema / regex / grammar larger than this is refused
MAX_SCHEMA_DEPTH = 32  # nesting of a JSON schema (objects and lists)
MAX_SCHEMA_NODES = 20_000  # values in a JSON schema, counted as a tree (a shared sub-dict counts each time)
COMPILE_TIMEOUT_S = 10.0  # wall-clock limit of one compilation
COMPILE_CACHE_BYTES = 128 << 20
BATCH_FILL_MIN_ROWS = 4  # from this many constrained rows on, rows are filled by a thread pool


@dataclass
class GrammarBitmask:
    """One step's mask: ``bitmask`` [B, ceil(V / 32)] int32 on the logits' device (bit set =
    token allowed), applied to the rows in ``rows`` only (row order = the step's sampling rows)."""
    bitmask: torch.Tensor
    rows: list[int]
    # ``rows`` on the logits' device (int32), or None when every row is constrained. A list
    # would reach the GPU through a pageable copy, which makes the host wait for the stream to
    # drain: the forward this mask was filled beside.
    indices: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of forbidden tokens to -inf, in place, on the constrained rows."""
        import xgrammar as xgr
        if logits.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(logits, self.bitmask, indices=self.rows)
        else:
            xgr.apply_token_bitmask_inplace(logits, self.bitmask, indices=self.indices)
        return logits


def _check_schema_size(schema) -> None:
    """Refuse a schema nested deeper than MAX_SCHEMA_DEPTH or with more than MAX_SCHEMA_NODES
    values, before anything serializes or compiles it (a dict reused at every level of a
    Python-built schema doubles its size per level)."""
    budget = MAX_SCHEMA_NODES
    stack = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0 or depth > MAX_SCHEMA_DEPTH:
            what = f"nested deeper than {MAX_SCHEMA_DEPTH}" if depth > MAX_SCHEMA_DEPTH else \
                f"larger than {MAX_SCHEMA_NODES} values"
            raise InvalidRequestError(f"structured_outputs.json: the schema is {what} (the limit)",
                                      "structured_outputs")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _source(p: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, text) of a constraint: the cache key and what gets compiled."""
    kind = p.kind()
    if kind == "json":
        if isinstance(p.json, str):
            if len(p.json) > MAX_GRAMMAR_BYTES:
                raise InvalidRequestError(f"structured_outputs.json is {len(p.json)} characters; the limit is "
                                          f"{MAX_GRAMMAR_BYTES} bytes", "structured_outputs")
            try:
                _check_schema_size(json.loads(p.json))
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"invalid structured_outputs.json: not JSON ({e})",
                                          "structured_outputs") from None
            text = p.json
        else:
            _check_schema_size(p.json)
            text = json.dumps(p.json)  # key order kept: it is the order the properties are generated in
    elif kind == "json_object":
        text = ""
    elif kind == "choice":
        text = json.dumps(p.choice)
    else:
        text = getattr(p, kind)
    if len(text.encode("utf-8")) > MAX_GRAMMAR_BYTES:
        raise InvalidRequestError(f"structured_outputs.{kind} is {len(text)} characters; the limit is "
                                  f"{MAX_GRAMMAR_BYTES} bytes", "structured_outputs")
    return kind, text


def _ebnf_string(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid EBNF string literal in xgrammar


class StructuredOutputManager:
    """Owned by the engine; ``compile`` is thread-safe (the server calls it off the engine thread)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_num_seqs: int,
                 device: torch.device):
        import xgrammar as xgr
        self._xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_limit_bytes=COMPILE_CACHE_BYTES)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="miniinfer-grammar")
        self._lock = threading.Lock()
        self._compiled: dict[tuple[str, str], object] = {}  # small front cache of whole grammars
        self.device = device
        shape = xgr.get_bitmask_shape(max(max_num_seqs, 1), self.info.vocab_size)
        self.bitmask_width = shape[1]  # int32 words per bitmask row: ceil(vocab / 32)
        pin = device.type == "cuda"
        self._host = [torch.empty(shape, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._rows = [torch.empty(shape[0], dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self.overlap = True  # False: wait for the forward before filling (the A/B baseline)
        self.parallel_tasks = False  # run_tasks on the fill threads (see there)
        # Many rows are filled by threads of our own, started once (30-150 µs a row on one
        # core); see FillPool for why not xgrammar's BatchGrammarMatcher(max_threads=n).
        threads = fill_threads(device)
        self._fill_pool = FillPool(threads) if threads >= 2 else None
        self.fill_times_us: collections.deque[float] = collections.deque(maxlen=100_000)  # host time per fill
        self._step_pool: ThreadPoolExecutor | None = None  # deferred sampling's grammar thread (start_step)
        self._step_batch = None

    # --- compilation ---------------------------------------------------------------------
    def compile(self, p: StructuredOutputsParams, timeout_s: float = COMPILE_TIMEOUT_S):
        """The compiled grammar of a constraint. Raises ``InvalidRequestError`` naming the
        problem for an invalid schema / regex / grammar, one over the size limit, or one whose
        compilation takes longer than ``timeout_s`` (it is abandoned; the engine goes on)."""
        key = _source(p)
        with self._lock:
            hit = self._compiled.get(key)
        if hit is not None:
            return hit
        future = self._pool.submit(self._compile, *key)
        try:
            grammar = future.result(timeout=timeout_s)
        except FutureTimeout:
            future.cancel()  # still queued: never runs; running: finishes in the background (no way to stop it)
            raise InvalidRequestError(f"structured_outputs.{key[0]} took longer than {timeout_s:g} s to compile",
                                      "structured_outputs") from None
        except (RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise InvalidRequestError(f"invalid structured_outputs.{key[0]}: {first[:300]}",
                                      "structured_outputs") from None
        with self._lock:
            if len(self._compiled) > 256:
                self._compiled.clear()
            self._compiled[key] = grammar
        return grammar

    def _compile(self, kind: str, text: str):
        c = self.compiler
        if kind == "json":
            return c.compile_json_schema(text, any_whitespace=False)
        if kind == "json_object":
            return c.compile_builtin_json_grammar()
        if kind == "regex":
            return c.compile_regex(text)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(_ebnf_string(x) for x in json.loads(text)))
        return c.compile_grammar(text)

    def new_matcher(self, grammar):
        return self._xgr.GrammarMatcher(grammar)

    # --- per step ---------------------------------------------------------------------------
    def fill_bitmask(self, seqs: list) -> GrammarBitmask | None:
        """The runner's hook between forward and sampling: fill the bitmask rows of the
        constrained sequences among this step's sampling rows (``seqs``, in row order) on the
        host and start its copy to the device. None when no row is constrained."""
        # a sequence finished by the previous step (processed just before) is still in this
        # batch: its token will be dropped, its matcher may have terminated: no row for it
        rows = [i for i, s in enumerate(seqs) if s.grammar_active and not s.is_finished]
        if not rows:
            return None
        if not self.overlap and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # serial baseline: the fill starts after the forward
        t0 = time.perf_counter()
        host = self._next_host(len(seqs))
        self.fill_rows([seqs[i].grammar for i in rows], host, rows)
        self.fill_times_us.append((time.perf_counter() - t0) * 1e6)
        return self._to_device(host, rows)

    def start_step(self, accept: list[tuple[object, int]], seqs: list) -> GrammarStepJob:
        """Deferred sampling (see ``step_job.py``): advance each ``(sequence, token)`` of
        ``accept`` (the previous step's committed tokens) now, then on the grammar thread fill
        the rows of the constrained sequences among ``seqs`` (this step's sampling rows, in
        order) whose matcher is still live. ``finish_step`` gives the mask."""
        if self._step_pool is None:
            self._step_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="miniinfer-grammar-step")
            # one GIL-free call whose C++ threads split the rows: FillPool's workers would each
            # take the GIL back after every chunk, from an engine thread busy in Python (H200
            # host, Qwen2-0.5B bs 64: fill p50 ~0.86 ms this way, ~1.8 ms through the pool)
            self._step_batch = self._xgr.BatchGrammarMatcher(max_threads=fill_threads(self.device))
        rows = [i for i, s in enumerate(seqs) if s.grammar_active and not s.is_finished]
        return GrammarStepJob(self._step_pool, self._step_batch.batch_fill_next_token_bitmask, accept,
                              [seqs[i] for i in rows], rows, self._next_host(len(seqs)))

    def finish_step(self, job: GrammarStepJob) -> GrammarBitmask | None:
        """Wait for ``job`` and start its mask's copy to the device; None when no row is
        constrained. Raises the job's error."""
        rows = job.rows()
        if not rows:
            return None
        self.fill_times_us.append(job.fill_us)
        return self._to_device(job.host, rows)

    def fill_rows(self, matchers: list, host: torch.Tensor, rows: list[int]) -> None:
        """``host[rows[j]]`` from ``matchers[j]``: on the fill threads when there are many rows."""
        if self._fill_pool is not None and len(rows) >= BATCH_FILL_MIN_ROWS:
            self._fill_pool.fill(matchers, host, rows)
        else:
            for m, i in zip(matchers, rows):
                m.fill_next_token_bitmask(host, i)

    def _next_host(self, num_rows: int) -> torch.Tensor:
        """This step's host bitmask rows: the other of two (pinned on CUDA) buffers, grown when
        a step has more rows (speculative verifies: one per draft position)."""
        self._turn ^= 1
        if num_rows > self._host[0].shape[0]:
            self._host = [torch.empty((num_rows, t.shape[1]), dtype=torch.int32, pin_memory=t.is_pinned())
                          for t in self._host]
            self._rows = [torch.empty(num_rows, dtype=torch.int32, pin_memory=t.is_pinned()) for t in self._rows]
        return self._host[self._turn][:num_rows]

    def _to_device(self, host: torch.Tensor, rows: list[int]) -> GrammarBitmask:
        """The mask on the logits' device, copied without making the host wait (pinned)."""
        if self.device.type != "cuda":
            return GrammarBitmask(host, rows)
        indices = None
        if len(rows) < host.shape[0]:
            pinned = self._rows[self._turn][:len(rows)]
            pinned.copy_(torch.tensor(rows, dtype=torch.int32))
            indices = pinned.to(self.device, non_blocking=True)
        return GrammarBitmask(host.to(self.device, non_blocking=True), rows, indices)


    def fill_verify_bitmask(self, seqs: list, drafts: list[list[int]], parents: list[list[int]],
                            seq_rows: list[range]) -> GrammarBitmask | None:
        """A speculative verify's mask: for each constrained sequence (``seqs[i]`` with draft
        tokens ``drafts[i]`` whose tree is ``parents[i]`` — draft j's parent, -1 for the last
        token; a chain is ``[-1, 0, 1, ...]`` — and logits rows ``seq_rows[i]`` = its last
        token, then one per draft), the row of each node allows what the grammar allows after
        the path to it. xgrammar walks the tree from the matcher's state and rolls it back
        (``GrammarMatcher.traverse_draft_tree``). Rows under a draft the grammar forbids are
        never used (no path through it is accepted) and allow everything, so that no row is
        all -inf. None when no sequence is constrained."""
        constrained = [i for i, s in enumerate(seqs) if s.grammar_active and not s.is_finished]
        if not constrained:
            return None
        if not self.overlap and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        host = self._next_host(seq_rows[-1].stop)
        self.fill_trees(host, [(seqs[i].grammar, drafts[i], parents[i], seq_rows[i].start) for i in constrained])
        rows = [r for i in constrained for r in range(seq_rows[i].start, seq_rows[i].start + len(drafts[i]) + 1)]
        return self._to_device(host, rows)

    def fill_trees(self, host: torch.Tensor, trees: list[tuple[object, list[int], list[int], int]]) -> None:
        """Verify rows of several draft trees into ``host`` [rows, W] int32 (CPU): -1 everywhere,
        then for each ``(matcher, tokens, parents, start)`` its tree's rows at ``host[start:start
        + 1 + len(tokens)]`` (``fill_verify_rows``; one tree a ``run_tasks`` task). The time goes
        to ``fill_times_us``."""
        t0 = time.perf_counter()
        host.fill_(-1)
        self.run_tasks([functools.partial(self.fill_verify_rows, m, tokens, parents, host[at:at + len(tokens) + 1])
                        for m, tokens, parents, at in trees])
        self.fill_times_us.append((time.perf_counter() - t0) * 1e6)

    @staticmethod
    def fill_verify_rows(matcher, tokens: list[int], parents: list[int], block: torch.Tensor) -> None:
        """One draft tree's verify rows into ``block`` [1 + n, W] int32 (CPU): row 0 what may
        follow the committed tokens, row i + 1 what may follow the path to ``tokens[i]``
        (``parents[i]``: index or -1 for the root); the matcher is rolled back. The row of a
        node under a forbidden token (all zero) is set to allow everything: it is never used
        (no path through it is accepted) and a row of -inf only would break sampling."""
        _walk_tree(matcher, tokens, parents, block)
        rows_np = block.numpy()  # (NumPy: ~3 µs for 11 rows, torch's mask ops ~27 µs)
        forbidden = ~rows_np.any(axis=1)
        if forbidden.any():
            rows_np[forbidden] = -1

    def run_tasks(self, tasks: list) -> None:
        """Run independent host tasks (e.g. one draft tree's walk through its own matcher),
        one after another on this thread, or on the fill threads with ``parallel_tasks`` set.
        Off by default: each walk holds the GIL for its Python and torch glue, and on the
        H200 host's 16 cores the verify mask of 8 trees of 11 nodes took 3.45 ms on the
        threads against ~2.3 ms one after another (§12, session 9; on 2 cores: 0.75 vs 1.1 ms).
        Returns when all are done."""
        if self.parallel_tasks and self._fill_pool is not None and len(tasks) >= 2:
            self._fill_pool.run(tasks)
        else:
            for task in tasks:
                task()

    def fill_tree_bitmask(self, matcher, tokens: list[int], parents: list[int]) -> torch.Tensor:
        """Rows [1 + n, W] int32 (CPU) of a draft tree walked from ``matcher``'s state and rolled
        back: row 0 what may follow the committed tokens, row i + 1 what may follow the path to
        ``tokens[i]`` (``parents[i]``: index or -1 for the root); all zero under a forbidden
        token. For grammar-aware drafting (``spec_decode/grammar_draft.py``)."""
        rows = torch.zeros(self._xgr.get_bitmask_shape(len(tokens) + 1, self.info.vocab_size), dtype=torch.int32)
        _walk_tree(matcher, tokens, parents, rows)
        return rows


def _walk_tree(matcher, tokens: list[int], parents: list[int], out: torch.Tensor) -> None:
    """``matcher.traverse_draft_tree`` over a draft tree (node 0 the committed state, node j + 1
    draft j), one bitmask row per node into ``out`` [1 + n, W] int32; the matcher is rolled back."""
    first_child, next_sibling = _child_sibling_lists(parents)
    matcher.traverse_draft_tree(torch.tensor(first_child, dtype=torch.int64),
                                torch.tensor(next_sibling, dtype=torch.int64),
                                torch.tensor([0] + tokens, dtype=torch.int64), out)


def _child_sibling_lists(parents: list[int]) -> tuple[list[int], list[int]]:
    """A tree as xgrammar walks it (node 0 the root, node j + 1 draft j): each node's first
    child and next sibling (-1: none), children in draft order."""
    n = len(parents) + 1
    first_child, next_sibling, last_child = [-1] * n, [-1] * n, [-1] * n
    for j, p in enumerate(parents):
        node, parent = j + 1, p + 1
        if last_child[parent] < 0:
            first_child[parent] = node
        else:
            next_sibling[last_child[parent]] = node
        last_child[parent] = node
    return first_child, next_sibling
