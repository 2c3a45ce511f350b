"""Masked statistics over padded (B, T) tensors: one definition each, used by every recipe.

`mask` is 1 (or True) where a token counts and 0 where it is padding or prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·m over `dim` (all elements when None)."""
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·m / Σ m over `dim`; a row with no counted element gives 0, not NaN."""
    m = mask.to(x.dtype)
    total = (x * m).sum() if dim is None else (x * m).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the counted elements of x (a scalar), Bessel-corrected when `unbiased`."""
    mean = masked_mean(x, mask)
    m = mask.to(x.dtype)
    sq = masked_sum((x - mean) ** 2, m)
    n = m.sum()
    if unbiased:
        return sq / (n - 1).clamp(min=1)
    return sq / n.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − μ)/σ over the counted elements (μ restored when `shift_mean` is False).

    Padding positions are returned as 0 so they can never leak into a later sum.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)
