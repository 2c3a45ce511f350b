"""Supervised fine-tuning loss: negative log-likelihood of the response tokens."""

from __future__ import annotations

from torch import Tensor


def sft_loss(token_logps: Tensor, mask: Tensor, *, normalizer: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """L = −Σ_t m_t log π(y_t | x, y_<t) / N.

    token_logps: (B, T) log-probs of the target tokens; mask: (B, T) 1 on response tokens.
    N = `normalizer` when given (the token count of the whole optimizer step, across
    micro-batches and processes, so accumulation and DDP give exactly the full-batch mean),
    else the number of masked tokens here.
    """
    m = mask.to(token_logps.dtype)
    total = -(token_logps * m).sum()
    n = m.sum()
    loss = total / (normalizer if normalizer is not None else n.clamp(min=1))
    return loss, {"nll_sum": total.detach(), "tokens": n.detach()}
