"""How rank 0 hands each step's inputs to the other tensor-parallel ranks.

A step's inputs are one :class:`~miniinfer.worker.input_batch.StepHeader` and one packed
int64 host buffer (``input_batch.prepare_inputs``). Two channels carry them, no pickle:

* :class:`ShmStepChannel` (ranks on one host, started by the engine): a ring of slots in
  one shared-memory tensor. Rank 0 writes a slot and then bumps a sequence number; each
  worker spins on it, copies the slot out and acknowledges. No collective, no device work:
  every rank's host learns the step within microseconds and launches its own forward.
* :class:`BroadcastStepChannel` (ranks on several machines, ``torchrun``): the header and then
  the buffer by ``torch.distributed.broadcast`` (two collectives per step; the workers wait
  for the header on the host).

Shared-memory layout (int64)::

    [write seq, pad to 8][ack seq of reader 1, pad to 8] ... [slot 0][slot 1] ...
    slot = [header (len(StepHeader._fields))][payload (slot_numel)]

Ordering: x86-64 keeps stores in program order (TSO) and so do the aligned 8-byte stores
NumPy makes here, so a reader that sees the new sequence number sees the slot written
before it. A slot is reused only after every reader acknowledged the step it held.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from miniinfer.worker.input_batch import StepHeader

HEADER_LEN = len(StepHeader._fields)
_LINE = 8  # int64s per cache line: each counter on its own line
SPIN_S = 0.05  # a waiting rank spins this long after its last message, then naps 100 µs per check


def max_step_numel(max_tokens: int, max_seqs: int, max_model_len: int, block_size: int) -> int:
    """The largest packed step buffer (``StepHeader.buffer_len``) a configuration can produce."""
    width = -(-max_model_len // block_size)
    return 4 * max_tokens + 4 * max_seqs + 1 + max_seqs * width


class ShmStepChannel:
    """Writer (rank 0) and readers (ranks 1..N-1) of one shared-memory ring.

    Build it on rank 0 with ``ShmStepChannel.create``, pass ``.buffer`` to the workers (a
    shared CPU tensor: it pickles as a file descriptor into spawned processes) and open it
    there with ``ShmStepChannel(buffer, num_readers, slot_numel, reader=rank)``.
    ``alive()``, if given, is polled while waiting; when it returns False the wait raises
    ``RuntimeError``."""

    def __init__(self, buffer: torch.Tensor, num_readers: int, slot_numel: int, slots: int, reader: int = 0,
                 alive: Callable[[], bool] | None = None):
        self.buffer = buffer
        self.num_readers, self.slot_numel, self.slots, self.reader = num_readers, slot_numel, slots, reader
        self._arr = buffer.numpy()
        self._base = _LINE * (1 + num_readers)
        self._seq = int(self._arr[_LINE * reader]) if reader else int(self._arr[0])
        self.alive = alive

    @classmethod
    def create(cls, num_readers: int, slot_numel: int, slots: int = 3,
               alive: Callable[[], bool] | None = None) -> "ShmStepChannel":
        n = _LINE * (1 + num_readers) + slots * (HEADER_LEN + slot_numel)
        return cls(torch.zeros(n, dtype=torch.int64).share_memory_(), num_readers, slot_numel, slots, 0, alive)

    def _slot(self, seq: int) -> int:
        return self._base + (seq % self.slots) * (HEADER_LEN + self.slot_numel)

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        if ready():
            return
        start = time.monotonic()
        spins = 0
        while not ready():
            spins += 1
            if spins & 1023 == 0:
                if self.alive is not None and not self.alive():
                    raise RuntimeError(f"tensor-parallel rank died while {what}")
                if time.monotonic() - start > SPIN_S:
                    time.sleep(1e-4)

    def publish(self, header: StepHeader, payload: np.ndarray | torch.Tensor) -> None:
        """Rank 0: one step (``payload``: the packed int64 buffer on the host)."""
        n = len(payload)
        if n > self.slot_numel:
            raise ValueError(f"step buffer of {n} int64 exceeds the channel's slot ({self.slot_numel})")
        seq = self._seq + 1
        arr = self._arr
        acks = [_LINE * (r + 1) for r in range(self.num_readers)]
        self._wait(lambda: min(int(arr[a]) for a in acks) > seq - 1 - self.slots, "rank 0 waited for a free slot")
        at = self._slot(seq)
        arr[at:at + HEADER_LEN] = header
        arr[at + HEADER_LEN:at + HEADER_LEN + n] = payload.numpy() if isinstance(payload, torch.Tensor) else payload
        arr[0] = seq  # published: after the slot's stores
        self._seq = seq

    def receive(self) -> tuple[StepHeader, np.ndarray]:
        """Ranks > 0: the next step (a copy of its payload) — blocks until rank 0 publishes."""
        seq = self._seq + 1
        arr = self._arr
        self._wait(lambda: int(arr[0]) >= seq, "a worker waited for the next step")
        at = self._slot(seq)
        header = StepHeader(*arr[at:at + HEADER_LEN].tolist())
        n = header.buffer_len if header.kind else 0
        payload = arr[at + HEADER_LEN:at + HEADER_LEN + n].copy()
        arr[_LINE * self.reader] = seq  # acknowledged: the slot may be rewritten
        self._seq = seq
        return header, payload


class BroadcastStepChannel:
    """The same contract over ``torch.distributed.broadcast`` (any number of hosts)."""

    def __init__(self, tp, device: torch.device):
        self.tp, self.device = tp, device

    def publish(self, header: StepHeader, payload: np.ndarray | torch.Tensor) -> None:
        payload = torch.as_tensor(payload, dtype=torch.int64)
        self.tp.broadcast(torch.tensor(header, dtype=torch.int64, device=self.device))
        if header.kind:
            self.tp.broadcast(payload.to(self.device))

    def receive(self) -> tuple[StepHeader, np.ndarray]:
        h = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self.tp.broadcast(h)
        header = StepHeader(*h.tolist())
        if not header.kind:
            return header, np.empty(0, dtype=np.int64)
        buf = torch.empty(header.buffer_len, dtype=torch.int64, device=self.device)
        self.tp.broadcast(buf)
        return header, buf.cpu().numpy()
