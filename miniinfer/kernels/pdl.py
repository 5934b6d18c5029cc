"""Programmatic dependent launch (PDL) for the decode path's small kernels (Hopper and later).

A kernel launched with ``launch_pdl=True`` may be scheduled while the kernel before it in the
stream (or CUDA graph) is still running. Its programs must call :func:`pdl_wait` before they
touch memory the earlier kernel writes or reads; work that only reads constant data (a GEMV's
weights, :func:`prefetch_l2`) may go before it. ``pdl_wait`` also lets the *next* kernel
launch (``griddepcontrol.launch_dependents``) once every program of this one has waited, so at
most one kernel runs ahead of the one doing the work. Waiting is transitive: a kernel that has
passed its wait knows every earlier kernel in the stream has finished and its writes are
visible (PTX ISA, "griddepcontrol"; CUDA programming guide, "Programmatic Dependent Launch").

Host side: :func:`miniinfer.kernels._common.pdl_launch` gives a launch's extra kwargs
(``USE_PDL`` and ``launch_pdl``), off on the CPU interpreter, before sm_90 and with
``MINIINFER_PDL=0``. With ``USE_PDL`` False these helpers compile to nothing.
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


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 to fetch the cache line of each pointer in ``ptrs`` (any shape; no result, no
    fault on the hardware's side for valid addresses). Only for data no earlier kernel writes."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)
