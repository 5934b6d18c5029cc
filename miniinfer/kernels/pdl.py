"""Programmatic dependent launch (PDL) for the decode path's small kernels (Hopper and later).

A kernel launched with ``launch_pdl=True`` may be scheduled while the kernel before it in the
stream (or CUDA graph) is still running. Its programs must call :func:`pdl_wait` before they
touch memory the earlier kernel writes or reads, so every kernel here calls it first. ``pdl_wait`` also lets the *next* kernel
launch (``griddepcontrol.launch_dependents``) once every program of this one has waited, so at
most one kernel runs ahead of the one doing the work. Waiting is transitive: a kernel that has
passed its wait knows every earlier kernel in the stream has finished and its writes are
visible (PTX ISA, "griddepcontrol"; CUDA programming guide, "Programmatic Dependent Launch").

Host side: :func:`miniinfer.kernels._common.pdl_launch` gives a launch's extra kwargs
(``USE_PDL`` and ``launch_pdl``), off on the CPU interpreter, before sm_90 and with
``MINIINFER_PDL=0``. With ``USE_PDL`` False the helper compiles to nothing.

Measured (H200, ``benchmarks/pdl_bench.py``, batch-1 decode graph): Qwen2-7B 3.949 -> 3.796 ms,
Qwen2-0.5B 0.819 -> 0.673 ms. An L2 prefetch of each GEMV program's first weight chunk before
its wait (the weight stream starting under the previous kernel) made it slower (Qwen2-7B: 3.869 ms
with one chunk, 4.056 with two) and was removed.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible, then allow the
    next kernel to launch. A no-op unless USE_PDL."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
