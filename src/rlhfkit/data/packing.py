"""Batching without padding waste: packed (padding-free) rows or length-grouped padding.

Packed: the examples of a micro-batch are concatenated into rows of at most
`PACK_ROW_TOKENS` tokens; position ids restart at each example and the model confines
attention to each example (see `LMBatch`), so no token attends across examples and almost
no compute goes to padding.
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
    return LMBatch(ids, attn, labels, loss_weights=_weights([[e.weight] * len(e) for e in examples], ids.shape))


def _weights(rows: list[list[float]], shape) -> torch.Tensor | None:
    """(B, T) per-token example weights (0 on padding), or None when every example weighs 1."""
    if all(w == 1.0 for row in rows for w in row):
        return None
    out = torch.zeros(shape, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


PACK_ROW_TOKENS = 2048  # default longest packed row; see collate_packed


def _first_fit(lengths: list[int], order: list[int], limit: int) -> list[list[int]]:
    """Indices per row: each example (in `order`) goes to the first row with room for it."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        r = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(limit)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def pack_rows(lengths: list[int], limit: int) -> list[list[int]]:
    """Example indices per row: as few rows R as first-fit by decreasing length finds with rows
    of at most `limit` tokens, then the narrowest width W that still takes them in R rows.

    The batch holds R·W positions for Σ n_i real tokens, and W ≥ max(max n_i, ⌈Σ n_i / R⌉);
    W is bisected between that bound and the first packing's widest row (first-fit at each
    trial width), so the rows come out about equally full instead of one short row padded to
    the longest: lengths 1020, 943, 896, 808, 462, 426, 297, 73 at limit 2048 take 3 rows of
    1704 (5,112 positions) rather than 3 rows of 2036 (6,108).
    """
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    best = _first_fit(lengths, order, limit)
    if len(best) < 2:
        return best
    width = lambda rows: max(sum(lengths[i] for i in row) for row in rows)  # noqa: E731
    lo, hi = max(max(lengths), -(-sum(lengths) // len(best))), width(best) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        rows = _first_fit(lengths, order, mid)
        if len(rows) <= len(best):
            best, hi = rows, width(rows) - 1
        else:
            lo = mid + 1
    return best


def collate_packed(examples: list[Encoded], pad_id: int = 0, row_tokens: int | None = None) -> LMBatch:
    """Pack the examples into rows of at most `row_tokens` tokens: (R, W), rows from `pack_rows`.

    Position ids restart at 0 for each example and `segment_ids` give each token its
    example's index in `examples` (−1 on padding), so per-example sums keep the input order
    whatever row an example lands in. Rows are right-padded to the longest row; the padding
    gets positions 0, 1, … of its own, so it is a separate (ignored) sequence for the model,
    and attention_mask 0.

    With rlhfkit's kernels (`models.attention`) a row costs Σ n_i² in attention, but a kernel
    that builds the row's T×T mask (transformers' own sdpa or eager) costs W², and one row for
    a whole micro-batch gets slow as batches grow (22.6k tokens in one row ran 4.7× slower than
    padding on an H100 with that mask): rows are capped at `row_tokens` (default
    `PACK_ROW_TOKENS`, or the longest example if longer).
    """
    limit = max(row_tokens or PACK_ROW_TOKENS, max((len(e) for e in examples), default=0))
    rows = pack_rows([len(e) for e in examples], limit)
    width = max((sum(len(examples[i]) for i in row) for row in rows), default=0)
    ids, labels, pos, seg, attn, weights = [], [], [], [], [], []
    for row in rows:
        r_ids, r_labels, r_pos, r_seg, r_weights = [], [], [], [], []
        for i in sorted(row):
            e = examples[i]
            r_ids += e.input_ids
            r_labels += e.labels
            r_pos += list(range(len(e)))
            r_seg += [i] * len(e)
            r_weights += [e.weight] * len(e)
        weights.append(r_weights)
        pad = width - len(r_ids)
        attn.append([1] * len(r_ids) + [0] * pad)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_labels + [IGNORE_INDEX] * pad)
        pos.append(r_pos + list(range(pad)))
        seg.append(r_seg + [-1] * pad)
    t = lambda x: torch.tensor(x, dtype=torch.long).reshape(len(rows), width)  # noqa: E731
    return LMBatch(t(ids), t(attn), t(labels), t(pos), t(seg), _weights(weights, (len(rows), width)))


def collate_shared_prompts(sequences: list[tuple[list[int], list[int]]], prompt_lengths: list[int]) -> LMBatch:
    """Sequences (input ids, shifted labels) in one packed row where consecutive sequences with
    the same prompt store it once: (1, N), N the tokens kept. The model's attention must be
    rlhfkit's (`models.attention`, which reads the branches from the position ids).

    A run of sequences s_1 … s_k with the same first P tokens (P = `prompt_lengths`) is laid
    out as s_1 whole (the trunk), then for each later s_j its tokens from P − 1 on (a branch),
    with position ids P − 1, P, …: the last prompt token is repeated per sequence, because
    its output predicts that sequence's first response token. So k samples of a P-token
    prompt cost P + Σ (R_j + 1) − 1 positions instead of Σ (P + R_j). A prompt's labels must
    be IGNORE_INDEX before its last token (they would count once, not k times).

    Sequences keep their order: the counted labels, read in order, are those of the input
    sequences in order (what `rollout.Rollout.response_layout` reads); `segment_ids` give each
    token its sequence's index (a shared prompt: the first sequence's). One row, no padding:
    rlhfkit's kernels attend each sequence and branch on its own, so a row costs what its
    sequences cost whatever its width (`collate_packed` caps rows for kernels that build the
    row's T×T mask, which cannot read branches anyway).
    """
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    seg: list[int] = []
    trunk: tuple[list[int], int] | None = None  # (ids, prompt length) of the current run's first sequence
    for i, ((s_ids, s_labels), p) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        if not 0 <= p <= len(s_ids) or len(s_labels) != len(s_ids):
            raise ValueError(f"sequence {i}: prompt length {p} for {len(s_ids)} tokens and {len(s_labels)} labels")
        if p > 0 and trunk is not None and trunk[1] == p and trunk[0][:p] == s_ids[:p]:
            if any(label != IGNORE_INDEX for label in s_labels[:p - 1]):
                raise ValueError(f"sequence {i}: a label before the last token of its shared prompt")
            start = p - 1
        else:
            trunk, start = (s_ids, p), 0
        ids += s_ids[start:]
        labels += s_labels[start:]
        pos += range(start, len(s_ids))
        seg += [i] * (len(s_ids) - start)
    row = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    return LMBatch(row(ids), torch.ones(1, len(ids), dtype=torch.long), row(labels), row(pos), row(seg))


def collate(examples: list[Encoded], pad_id: int, *, packed: bool) -> LMBatch:
    """`collate_packed` (one padding-free row set) or `collate_padded` (right-padded rows)."""
    return collate_packed(examples, pad_id) if packed else collate_padded(examples, pad_id)


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
