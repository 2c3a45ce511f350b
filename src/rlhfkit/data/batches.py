"""Typed batch containers and the one padding convention.

Sequences are right-padded. `attention_mask` is 1 on real tokens. `labels` holds the
token to predict at each position (already shifted: `labels[:, t]` is predicted from
positions ≤ t) with IGNORE_INDEX where nothing counts, so a loss mask is `labels != IGNORE_INDEX`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace

import torch
from torch import Tensor

from rlhfkit.ops.logprobs import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "LMBatch", "pad_right", "to_device"]


def _moved(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if is_dataclass(value):
        return to_device(value, device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def to_device(obj, device):
    """A copy of the frozen dataclass `obj` with every tensor on `device`: tensor fields,
    nested batches (themselves moved this way) and dicts of tensors; other fields as they are.
    The one `.to(device)` of every typed batch and rollout container."""
    return replace(obj, **{f.name: _moved(getattr(obj, f.name), device) for f in fields(obj)})


@dataclass(frozen=True)
class LMBatch:
    """Token sequences with shifted labels.

    input_ids, attention_mask, labels: (B, T). Packed rows (several examples concatenated
    in one row, no padding between them) carry `position_ids` (B, T) that restart at 0 for
    each example; the model then gets attention_mask=None and transformers confines
    attention to each example from the position ids. `segment_ids` (B, T) gives each
    token's example index in the batch (−1 on padding), for per-example sums.
    `loss_weights` (B, T) float holds each token's example weight when some example is
    weighted (None: every weight is 1); `weighted_loss_mask` folds it into the loss mask.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    position_ids: Tensor | None = None
    segment_ids: Tensor | None = None
    loss_weights: Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def num_examples(self) -> int:
        if self.segment_ids is None:
            return int(self.input_ids.shape[0])
        return int(self.segment_ids.max().item()) + 1

    def to(self, device) -> LMBatch:
        return to_device(self, device)

    @property
    def loss_mask(self) -> Tensor:
        return self.labels != IGNORE_INDEX

    @property
    def weighted_loss_mask(self) -> Tensor:
        """(B, T) float: the loss mask times each token's example weight."""
        mask = self.loss_mask.float()
        return mask if self.loss_weights is None else mask * self.loss_weights

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def pad_right(seqs: list[list[int]], value: int, length: int | None = None) -> Tensor:
    """Stack lists of ints into a (B, T) long tensor, right-padded with `value`."""
    T = length if length is not None else max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s[:T], dtype=torch.long)
    return out


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) position ids counting real tokens only, so a left-padded sequence sees the same
    positions (0, 1, 2, …) as the same sequence right-padded; the padding after a row's last
    real token keeps counting (mask 1 1 1 0 0 → 0 1 2 3 4), so position ids never step back
    inside a row (a step back marks a shared-prompt branch for rlhfkit's attention kernels,
    `models.attention.sequence_spans`)."""
    real = attention_mask.long()
    counted = (real.cumsum(-1) - 1).clamp(min=0)
    after_last = real.flip(-1).cumsum(-1).flip(-1) == 0
    return counted + after_last.long().cumsum(-1)
