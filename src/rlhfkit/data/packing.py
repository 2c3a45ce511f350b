"""Batching without padding waste: packed (padding-free) rows or length-grouped padding.

Packed: the examples of a micro-batch are concatenated into one row; position ids restart
at each example and the model confines attention to each example (see `LMBatch`), so no
token attends across examples and no compute goes to padding.
Padded: examples of similar length are grouped so right-padding stays small.

The order of micro-batches is a pure function of (seed, epoch), which is what makes resume
exact and lets several processes split one global batch deterministically.
"""

from __future__ import annotations

import random

import torch

from rlhfkit.data.batches import IGNORE_INDEX, LMBatch, pad_right
from rlhfkit.data.tokenize import Encoded


def collate_padded(examples: list[Encoded], pad_id: int) -> LMBatch:
    """Right-pad to the longest example: (B, T_max)."""
    ids = pad_right([e.input_ids for e in examples], pad_id)
    labels = pad_right([e.labels for e in examples], IGNORE_INDEX)
    attn = pad_right([[1] * len(e) for e in examples], 0)
    return LMBatch(ids, attn, labels)


def collate_packed(examples: list[Encoded], pad_id: int = 0) -> LMBatch:
    """Concatenate all examples into one row (1, Σ T_i) with restarting position ids."""
    ids, labels, pos, seg = [], [], [], []
    for i, e in enumerate(examples):
        ids += e.input_ids
        labels += e.labels
        pos += list(range(len(e)))
        seg += [i] * len(e)
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    return LMBatch(t(ids), torch.ones(1, len(ids), dtype=torch.long), t(labels), t(pos), t(seg))


def plan_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int,
                 group_by_length: bool = True, drop_last: bool = False) -> list[list[int]]:
    """Indices of each micro-batch for one epoch, shuffled reproducibly by (seed, epoch).

    With `group_by_length`, examples are sorted by length inside windows of 50 batches, so
    padded batches hold similar lengths while the batch order stays random.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * 50
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda j: lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length:
        rng.shuffle(batches)
    return batches
