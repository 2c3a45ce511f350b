"""Generalized Advantage Estimation (Schulman et al., 2016) over padded response tokens.

With m_t the mask (1 on real tokens) and V after a response's last real token taken as 0
(the episode ends there):

    δ_t = r_t + γ · m_{t+1} · V_{t+1} − V_t
    A_t = δ_t + γλ · m_{t+1} · A_{t+1}          (A_T = 0)
    R_t = A_t + V_t                              the value-function target

Both A and R are 0 on padding. γ = λ = 1 makes R the plain reward-to-go Σ_{s≥t} r_s.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> None:
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and "
                         f"mask {tuple(mask.shape)} must all be the same (B, T) shape")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float,
        lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns by one reverse scan over T, vectorized over the batch.

    rewards, values, mask: (B, T). Returns (advantages (B, T), returns (B, T)), no gradient
    (they are regression/policy targets, computed once per rollout).
    """
    _check(rewards, values, mask, gamma, lam)
    m = mask.to(values.dtype)
    values = values * m  # padding values must not leak in as V_{t+1}
    batch, length = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(batch)
    next_advantage = values.new_zeros(batch)
    next_mask = values.new_zeros(batch)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_mask * next_value - values[:, t]
        advantage = delta + gamma * lam * next_mask * next_advantage
        advantages[:, t] = advantage
        next_value, next_advantage, next_mask = values[:, t], advantage, m[:, t]
    advantages = advantages * m
    returns = (advantages + values) * m
    return advantages, returns

