"""Input preparation: a ``SchedulerOutput`` flattened into device tensors.

The one home of the per-token slot mapping and of the rows that need logits. A step's
inputs travel to the device as **one** int64 buffer (one host→device copy; on CUDA through
pinned staging), described by a :class:`StepHeader`, and are split there into views::

    [input_ids T][positions T][slot_mapping T][logits_indices L][query_start_loc B+1]
    [seq_lens B][block_tables B*W][fill_at F][fill_rows F][tree_mask T, draft trees only]

Tensor-parallel ranks receive the header and the host buffer (``worker/step_channel.py``)
and rebuild the same views (``inputs_from_host``).
A sequence verifying k draft tokens (speculative decoding) feeds its last token and the
drafts as one (1 + k)-token extend and gets a logits row for each of them. A draft *tree*
(``ScheduledSeq.draft_parents``) takes consecutive cache slots in topological order, positions
``start + depth`` and a ``tree_mask`` row each (see ``attention/metadata.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from miniinfer.attention.metadata import AttentionMetadata, cache_slot, cache_slots, tree_mask_row
from miniinfer.engine.sequence import Sequence
from miniinfer.engine.step import SchedulerOutput
from miniinfer.worker.host_staging import PinnedStaging

STEP, STOP = 1, 0  # StepHeader.kind


class StepHeader(NamedTuple):
    """Sizes of the parts of a packed step buffer (and two attention bounds)."""
    kind: int  # STEP, or STOP (tensor-parallel workers: exit)
    num_tokens: int  # T
    num_logits: int  # L: rows whose logits are computed (the sampling sequences' last tokens)
    num_seqs: int  # B
    table_width: int  # W: block-table entries per sequence (padded with 0)
    num_fills: int  # F: inputs that are placeholders, filled on the device from the last step
    num_decodes: int  # the first num_decodes sequences have one new token
    max_query_len: int
    max_seq_len: int
    has_tree: int = 0  # 1: a tree_mask part [T] follows (speculative verify of draft trees)

    @property
    def buffer_len(self) -> int:
        t, b = self.num_tokens, self.num_seqs
        return 3 * t + self.num_logits + 2 * b + 1 + b * self.table_width + 2 * self.num_fills + self.has_tree * t


@dataclass
class InputBatch:
    """A step's inputs on the device (views into the packed buffer)."""
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [L] int64: rows of the hidden states to compute logits for
    sampling_seqs: list[Sequence]  # the sequences those rows belong to (empty on TP workers)
    fill_at: torch.Tensor | None  # [F] int64: rows of input_ids that are placeholders ...
    fill_rows: torch.Tensor | None  # [F] int64: ... and their rows in the last step's sampled ids
    seq_rows: list[range] | None = None  # with drafts: the logits rows of each sampling sequence


def prepare_inputs(sched: SchedulerOutput, block_size: int,
                   staging: PinnedStaging) -> tuple[InputBatch, StepHeader, np.ndarray]:
    """Flatten the batch into one host int64 buffer and copy it to the device once.
    Returns the batch, its header and the host buffer (for tensor-parallel ranks)."""
    staging.begin_step()
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    q_lens, seq_lens, tables, logits_idx, sampling_seqs = [], [], [], [], []
    fill_at: list[int] = []
    fill_rows: list[int] = []
    num_decodes = 0
    seq_rows: list[range] = []
    tree_rows: list[int] | None = None  # draft trees: every token's tree_mask value (-1: causal)
    for s in sched.scheduled:
        seq, n, start = s.seq, s.num_new_tokens, s.start
        table = seq.block_table
        end = start + n
        if n == 1:
            num_decodes += 1
            token = seq.token_ids[start]
            if token < 0:
                fill_at.append(len(input_ids))
                fill_rows.append(seq.pending_row)
            input_ids.append(token)
            positions.append(start)
            slots.append(cache_slot(table, start, block_size))
        else:
            draft = s.draft_token_ids
            input_ids.extend(seq.token_ids[start:end - len(draft)] + draft if draft else seq.token_ids[start:end])
            slots.extend(cache_slots(table, start, end, block_size))
            if s.draft_parents is None:
                positions.extend(range(start, end))
            else:
                depths = draft_depths(s.draft_parents)
                positions.append(start)
                positions.extend(start + d for d in depths)
                tree_rows = tree_rows if tree_rows is not None else []
                tree_rows += [-1] * (len(input_ids) - n - len(tree_rows))
                tree_rows += tree_mask_rows(s.draft_parents, start, end)
        q_lens.append(n)
        seq_lens.append(end)
        tables.append(table)
        if s.samples:
            rows = len(s.draft_token_ids) + 1
            seq_rows.append(range(len(logits_idx), len(logits_idx) + rows))
            logits_idx.extend(range(len(input_ids) - rows, len(input_ids)))
            sampling_seqs.append(seq)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    width = max(map(len, tables))
    flat_tables: list[int] = []
    for t in tables:
        flat_tables.extend(t)
        flat_tables.extend([0] * (width - len(t)))
    if tree_rows is not None:
        tree_rows += [-1] * (len(input_ids) - len(tree_rows))
    header = StepHeader(STEP, len(input_ids), len(logits_idx), len(q_lens), width, len(fill_at), num_decodes,
                        max(q_lens), max(seq_lens), int(tree_rows is not None))
    host = np.array(input_ids + positions + slots + logits_idx + qsl + seq_lens + flat_tables + fill_at + fill_rows
                    + (tree_rows or []), dtype=np.int64)
    buf = staging.to_device(torch.from_numpy(host), torch.int64)
    staging.end_step()
    batch = unpack_inputs(buf, header)
    batch.sampling_seqs = sampling_seqs
    if len(logits_idx) > len(sampling_seqs):
        batch.seq_rows = seq_rows
    batch.attn_metadata.query_start_loc_cpu, batch.attn_metadata.seq_lens_cpu = qsl, seq_lens
    batch.attn_metadata.tree_mask_cpu = tree_rows
    return batch, header, host


def draft_depths(parents: list[int]) -> list[int]:
    """Depth (1 = a child of the sequence's last token) of each draft of a tree."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


def tree_mask_rows(parents: list[int], start: int, end: int) -> list[int]:
    """``tree_mask`` values of a verify's rows: the last token (KV index ``start``) and drafts
    1..n at ``start + j``; each sees the cached prefix, its ancestors and itself."""
    seen: list[tuple[int, ...]] = [(start,)]
    for j, p in enumerate(parents):
        seen.append(seen[p + 1] + (start + j + 1,))
    return [tree_mask_row(end, start, keys) for keys in seen]


def inputs_from_host(header: StepHeader, host: np.ndarray, staging: PinnedStaging) -> InputBatch:
    """A tensor-parallel worker's batch from the header and host buffer rank 0 published
    (no sampling sequences: only rank 0 samples)."""
    staging.begin_step()
    buf = staging.to_device(torch.from_numpy(host), torch.int64)
    staging.end_step()
    batch = unpack_inputs(buf, header)
    at = 3 * header.num_tokens + header.num_logits
    b = header.num_seqs
    batch.attn_metadata.query_start_loc_cpu = host[at:at + b + 1].tolist()
    batch.attn_metadata.seq_lens_cpu = host[at + b + 1:at + 2 * b + 1].tolist()
    return batch


def unpack_inputs(buf: torch.Tensor, h: StepHeader) -> InputBatch:
    """The views of a packed step buffer (the inverse of the packing in ``prepare_inputs``)."""
    t, b, nf = h.num_tokens, h.num_seqs, h.num_fills
    parts = torch.split(buf, [t, t, t, h.num_logits, b + 1, b, b * h.table_width, nf, nf, h.has_tree * t])
    meta = AttentionMetadata(
        num_decodes=h.num_decodes, num_decode_tokens=h.num_decodes,
        query_start_loc=parts[4].to(torch.int32), seq_lens=parts[5].to(torch.int32),
        block_tables=parts[6].view(b, h.table_width).to(torch.int32), slot_mapping=parts[2],
        max_query_len=h.max_query_len, max_seq_len=h.max_seq_len,
        tree_mask=parts[9] if h.has_tree else None)
    return InputBatch(parts[0], parts[1], meta, parts[3], [], parts[7] if nf else None, parts[8] if nf else None)


def meta_from_lists(q_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
                    slot_mapping: torch.Tensor, num_decodes: int, device: torch.device) -> AttentionMetadata:
    """Attention metadata built directly from host lists (profiling and test forwards)."""
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    return AttentionMetadata(
        num_decodes=num_decodes, num_decode_tokens=num_decodes,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=slot_mapping, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens))
