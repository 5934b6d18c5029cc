"""The threads that fill many grammar-mask rows at once (xgrammar calls that release the GIL)."""
from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

# At most this many threads fill one step's rows. Measured on the H200 host's 16 Xeon cores
# (benchmarks/grammar_fill_bench.py, 64 rows of Qwen2's vocabulary, 50 µs a row on one core):
# one thread 3.5 ms, 8 threads 1.32 ms, 16 threads 1.92 ms. xgrammar's own C++ threads
# flatten too (1.23 ms at 8, 1.22 at 16): the fill stops scaling near 3x on that host, and
# past 8 our Python workers only add hand-offs. MINIINFER_FILL_THREADS overrides it.
MAX_FILL_THREADS = int(os.environ.get("MINIINFER_FILL_THREADS", "8"))


def fill_threads(device: torch.device) -> int:
    """Threads that fill a step's mask rows (the engine thread is one of them): the CPUs this
    process may run on (not ``os.cpu_count()``, the whole host's), at most MAX_FILL_THREADS.
    When the model runs on the CPU, less torch's other intra-op threads: they spin-wait between
    the step's ops and keep their cores (measured on 2 cores, torch at 2 threads: a 2-thread
    fill took as long as one thread, 4.7 vs 4.4 ms for 64 rows; torch at 1 thread: 2.7 ms)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    if device.type == "cpu":
        n -= torch.get_num_threads() - 1
    return max(1, min(MAX_FILL_THREADS, n))


class FillPool:
    """Fills many matchers' rows at once on threads started once, the caller being one of them.

    xgrammar 0.2.9's ``BatchGrammarMatcher(max_threads=n)`` creates and joins ``n`` OS threads
    inside every ``batch_fill_next_token_bitmask`` call (counted with strace: 2 clones per call
    at n = 2): ~60 µs per step on 2 cores (on the 16-core GPU host, 64 rows, it matched this
    pool: 1.23 vs 1.32 ms at 8 threads). Here each thread (a persistent worker, or the caller) takes chunks of rows from
    a shared counter and fills each chunk with one ``BatchGrammarMatcher(max_threads=1)`` call
    of its own, which runs in the calling thread with the GIL released (no thread created).
    Chunks are interleaved rows, twice as many as threads, taken in turn: a slow row delays
    only its own chunk. Distinct matchers write distinct rows, as in xgrammar's own batch fill.

    How many threads: waking a worker costs tens of µs, and a row costs from ~5 µs (a 49k
    vocabulary) to ~300 µs (151k, inside a bounded string), so the count follows the work: one
    thread per ``WORK_PER_THREAD_US`` of the step's expected fill (rows × the running mean of a
    row's CPU time, measured per chunk), at least one, at most ``threads``."""

    WORK_PER_THREAD_US = 100.0

    def __init__(self, threads: int):
        import xgrammar as xgr
        self.threads = threads
        self.row_us = 100.0  # running mean of one row's fill, CPU µs (first steps: a guess)
        self._xgr = xgr
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="miniinfer-fill")

    def _batch(self):
        b = getattr(self._local, "batch", None)
        if b is None:
            b = self._local.batch = self._xgr.BatchGrammarMatcher(max_threads=1)
        return b

    def _work(self, chunks, counter, matchers, bitmask, cpu: list) -> None:
        batch = self._batch()
        t0 = time.thread_time()
        while True:
            k = next(counter)  # atomic under the GIL
            if k >= len(chunks):
                break
            rows = chunks[k]
            batch.batch_fill_next_token_bitmask([matchers[j] for j in rows[0]], bitmask, rows[1])
        cpu.append(time.thread_time() - t0)

    def run(self, tasks: list) -> None:
        """Call every task (no arguments; independent of each other, e.g. one draft tree's walk
        through its own matcher, whose xgrammar call releases the GIL) on up to ``threads``
        threads, the caller one of them; returns when all are done (a task's error raised)."""
        counter = itertools.count()
        # inference mode is per thread: a task may update tensors made under the caller's
        inference = torch.is_inference_mode_enabled()

        def drain() -> None:
            with torch.inference_mode(inference):
                while (k := next(counter)) < len(tasks):  # next() is atomic under the GIL
                    tasks[k]()

        futures = [self._pool.submit(drain) for _ in range(min(self.threads, len(tasks)) - 1)]
        try:
            drain()
        finally:
            for f in futures:
                f.result()

    def fill(self, matchers: list, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Fill ``bitmask[rows[j]]`` from ``matchers[j]`` for every j."""
        n = len(rows)
        threads = max(1, min(self.threads, n, int(n * self.row_us / self.WORK_PER_THREAD_US)))
        k = 1 if threads == 1 else min(n, 2 * threads)
        chunks = [(range(j, n, k), rows[j::k]) for j in range(k)]
        counter = itertools.count()
        cpu: list[float] = []
        futures = [self._pool.submit(self._work, chunks, counter, matchers, bitmask, cpu)
                   for _ in range(threads - 1)]
        try:
            self._work(chunks, counter, matchers, bitmask, cpu)
        finally:
            for f in futures:
                f.result()  # every row written (and a worker's error raised) before the mask is used
        self.row_us += 0.2 * (sum(cpu) * 1e6 / n - self.row_us)
