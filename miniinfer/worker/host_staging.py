"""Host-to-device copies of a step's small inputs through page-locked (pinned) buffers.

Why: a ``non_blocking`` copy from ordinary (pageable) host memory is staged by the driver,
which may first wait for the stream to drain. With overlap scheduling that wait would block
the host at step N+1's input copy until step N's forward has finished, which is exactly the
overlap we want. From pinned memory the copy is queued and the host moves on.

Buffers are reused, so a step must not overwrite one whose copy is still queued::

    step:    N        N+1      N+2      N+3
    arena:   A        B        A        B        (two arenas, alternating)
    before writing arena A for step N+2, wait for the event recorded after step N's copies

The wait is nearly always already satisfied (step N has been collected by then), but steps
that sample nothing are never collected, so the event is what makes reuse safe.
"""
from __future__ import annotations

import numpy as np
import torch

_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


class PinnedStaging:
    def __init__(self, device: torch.device, turns: int = 2):
        self.device = device
        self.enabled = device.type == "cuda"
        self._arenas: list[dict[torch.dtype, torch.Tensor]] = [{} for _ in range(turns)]
        self._events: list["torch.cuda.Event | None"] = [None] * turns
        self._turn = 0
        self._used: dict[torch.dtype, int] = {}

    def begin_step(self) -> None:
        """Switch to the next arena, waiting until its previous copies have left it."""
        self._turn = (self._turn + 1) % len(self._arenas)
        self._used = {}
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()
            self._events[self._turn] = None

    def end_step(self) -> None:
        """Mark the point in the stream after which this step's arena may be reused."""
        if self.enabled and self._used:
            event = torch.cuda.Event()
            event.record()
            self._events[self._turn] = event

    def to_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        """``values`` (a list, or a host tensor) as a tensor on the device, copied without a sync.
        Lists go through NumPy, which converts Python ints ~4x faster than ``torch.tensor``."""
        if not isinstance(values, torch.Tensor):
            values = torch.from_numpy(np.array(values, dtype=_NUMPY[dtype]).reshape(-1))
        if not self.enabled:
            return values.to(self.device)
        host = values.to(dtype).reshape(-1)
        n = host.numel()
        arena = self._arenas[self._turn]
        used = self._used.get(dtype, 0)
        buf = arena.get(dtype)
        if buf is None or used + n > buf.numel():
            # A fresh, larger arena; copies already queued from the old one keep it alive
            # (the caching host allocator frees it only after their stream work completes).
            buf = arena[dtype] = torch.empty(max(2 * (used + n), 1 << 14), dtype=dtype, pin_memory=True)
            used = 0
        view = buf[used:used + n]
        view.copy_(host)
        self._used[dtype] = used + n
        return view.to(self.device, non_blocking=True)
