"""Sequence packing: variable-length samples laid end to end in rows of a fixed token budget, rows balanced
across data-parallel ranks by tokens, so no compute is spent on padding up to the longest response.

Inside a row, a block-diagonal causal mask keeps every sample attending only to itself
(`policy.packed_causal_mask`). Positions are not reset per sample: rotary embeddings make attention depend
only on the distance between two tokens of the same sample, so a packed sample sees exactly what it sees
alone (up to fp32 round-off in cos/sin at larger absolute positions). On GPU with Transformer Engine the same
plan maps onto THD packed sequences (cu_seqlens); the CPU local attention uses the explicit mask.

A packed MicroBatch carries `segments` [R, L]: the sample's index within its row, -1 on row padding. The
DynaMO centred entropy-change term averages over one sample's tokens, so modulation groups by segment too.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from dynamo_mega.parallel.train_step import MicroBatch


def sample_lengths(mask_NS: torch.Tensor) -> list[int]:
    """Tokens each sample needs in a row: up to and including its last loss position (later ones predict nothing)."""
    pos = torch.arange(mask_NS.shape[1])
    return [int(pos[m].max()) + 1 if m.any() else 1 for m in mask_NS]


def plan_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, each row's total length <= row_tokens. Deterministic."""
    too_long = [i for i, n in enumerate(lengths) if n > row_tokens]
    if too_long:
        raise ValueError(
            f"sample {too_long[0]} needs {lengths[too_long[0]]} tokens but optim.pack_row_tokens={row_tokens}; "
            f"raise optim.pack_row_tokens to at least {max(lengths)} (prompt + max response length)"
        )
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_tokens - lengths[i])
    return rows


def balance_rows(rows: list[list[int]], lengths: Sequence[int], dp_size: int) -> list[list[list[int]]]:
    """Rows per DP rank, heaviest row first to the least-loaded rank (LPT). Token loads differ by at most one
    row's tokens (<= row_tokens). Every rank gets at least one row when there are enough rows."""
    loads = [(0, rank) for rank in range(dp_size)]
    per_rank: list[list[list[int]]] = [[] for _ in range(dp_size)]
    for row in sorted(rows, key=lambda row: (-sum(lengths[i] for i in row), row)):
        load, rank = heapq.heappop(loads)
        per_rank[rank].append(row)
        heapq.heappush(loads, (load + sum(lengths[i] for i in row), rank))
    return per_rank


def pack_micro_batches(
    rows: list[list[int]],
    input_ids_NS: torch.Tensor,
    targets_NS: torch.Tensor,
    mask_NS: torch.Tensor,
    adv_N: torch.Tensor,
    rollout_logp_NS: torch.Tensor,
    rows_per_micro_batch: int,
) -> list[MicroBatch]:
    """This rank's rows as packed MicroBatches of `rows_per_micro_batch` rows, each trimmed to its fullest row."""
    lengths = sample_lengths(mask_NS)
    out = []
    for start in range(0, len(rows), rows_per_micro_batch):
        chunk = rows[start : start + rows_per_micro_batch]
        width = max(sum(lengths[i] for i in row) for row in chunk)
        fields = {
            "input_ids": torch.zeros(len(chunk), width, dtype=input_ids_NS.dtype),
            "targets": torch.zeros(len(chunk), width, dtype=targets_NS.dtype),
            "mask": torch.zeros(len(chunk), width, dtype=mask_NS.dtype),
            "advantages": torch.zeros(len(chunk), width, dtype=torch.float32),
            "rollout_logp": torch.zeros(len(chunk), width, dtype=rollout_logp_NS.dtype),
            "segments": torch.full((len(chunk), width), -1, dtype=torch.long),
        }
        for r, row in enumerate(chunk):
            at = 0
            for seg, i in enumerate(row):
                n, sl = lengths[i], slice(at, at + lengths[i])
                fields["input_ids"][r, sl] = input_ids_NS[i, :n]
                fields["targets"][r, sl] = targets_NS[i, :n]
                fields["mask"][r, sl] = mask_NS[i, :n]
                fields["advantages"][r, sl] = adv_N[i].float() * mask_NS[i, :n]
                fields["rollout_logp"][r, sl] = rollout_logp_NS[i, :n]
                fields["segments"][r, sl] = seg
                at += n
        out.append(MicroBatch(**fields))
    return out
