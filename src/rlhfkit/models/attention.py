"""The attention kernel rlhfkit trains with on CPU: matmul attention with fp32 scores.

On CPU, PyTorch's fused SDPA kernel has a slow backward at the short sequences RLHF trains
on (≈ 10 ms per layer for 8 × 72 tokens, 5× its forward: 0.3 s of a 2.5 s SFT step of the
embedded model). Plain matmul attention is much faster there, but transformers' "eager"
version rounds the scores QKᵀ to bf16 under autocast before the softmax, which moves the
loss by ~1e-3 compared with SDPA (whose kernel accumulates in fp32).

`fp32_matmul_attention` computes, per head, with autocast off and every tensor in fp32:

    A = softmax(Q Kᵀ · scale + M),   O = A V          Q: (B, H, T, d)  K, V: (B, H_kv, S, d)

(M the additive mask transformers builds for "eager": 0 where attention is allowed, −∞/min
elsewhere, so padding and packed-sequence boundaries are respected), and returns O in the
caller's dtype. The attention FLOPs are a small part of a step at these lengths (≈ 2% for
the embedded model at 72 tokens), so doing them in fp32 costs little and matches SDPA's
numerics. Above `MATMUL_MAX_ELEMENTS` score elements per call (B·H·T·S), where the T×S
probabilities it keeps for the backward would cost too much memory, it hands the same
inputs to PyTorch's SDPA instead (which takes the same additive mask).
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "rlhfkit_fp32_matmul"
# 64 M fp32 scores = 256 MB kept per layer for the backward (8 × 9 heads × 944²).
MATMUL_MAX_ELEMENTS = 64 * 2**20


def fp32_matmul_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention-interface signature; returns ((B, T, H, d) output, weights or None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each K/V head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    mask = None if attention_mask is None else attention_mask[:, :, :, :key.shape[-2]]
    p = dropout if module.training else 0.0
    b, h, t, _ = query.shape
    if b * h * t * key.shape[-2] > MATMUL_MAX_ELEMENTS:
        if mask is not None:  # SDPA wants the mask in the query's dtype; a finite minimum keeps
            # fully masked (padding) rows uniform rather than NaN, as in the matmul path
            mask = mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p,
                                                         scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
        if mask is not None:
            scores = scores + mask.float()
        weights = nn.functional.softmax(scores, dim=-1)
        weights = nn.functional.dropout(weights, p=p, training=module.training)
        out = torch.matmul(weights, value.float())
    return out.transpose(1, 2).contiguous().to(query.dtype), weights


def register() -> str:
    """Make NAME a valid `attn_implementation` (idempotent); returns NAME."""
    # Both registries live in transformers' modeling stack (~2 s to import): imported when a
    # model is built, not when the CLI starts.
    from transformers import AttentionInterface  # noqa: PLC0415 — see above
    from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: PLC0415 — see above

    AttentionInterface.register(NAME, fp32_matmul_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME
