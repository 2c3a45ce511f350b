"""The GRPO family's loss pieces, by hand: GSPO's sequence-level ratio and clip, per-token
advantages in grpo_loss (REINFORCE++), Dr. GRPO's constant length normalizer."""

import math

import pytest
import torch

from rlhfkit.losses.policy import aggregate, constant_length_normalized, grpo_loss, gspo_loss


def t(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def _gspo_case():
    # row 0: two tokens, log π − log π_old = [ln 2, 0]  →  s_0 = exp(ln 2 / 2) = √2 = 1.414214
    # row 1: one token (then a pad with junk), ln 0.5  →  s_1 = 0.5
    old = t([[-1.0, -1.0], [-1.0, -1.0]])
    logp = t([[-1 + math.log(2.0), -1.0], [-1 + math.log(0.5), 7.0]], grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    return logp, old, mask


def test_gspo_clips_the_sequence_ratio_by_hand():
    # A = [1, −1], ε_low = 0.2, ε_high = 0.3:
    #   row 0: min(√2·1, 1.3·1) = 1.3 (clipped)       → ℓ = −1.3 on both tokens
    #   row 1: min(0.5·−1, 0.8·−1) = −0.8 (clipped)    → ℓ = +0.8
    # sequence aggregation: (−1.3 + 0.8)/2 = −0.25; every token clipped; no gradient.
    # (Per token, row 0's second token has ρ = 1 and would give ℓ = −1, not −1.3.)
    logp, old, mask = _gspo_case()
    surrogate, penalty, m = gspo_loss(logp, old, old, t([1.0, -1.0]), mask, clip_eps=0.2, clip_eps_high=0.3,
                                      kl_coef=0.0, kl_estimator="k3")
    torch.testing.assert_close(surrogate * mask, t([[-1.3, -1.3], [0.8, 0.0]]))
    loss = aggregate(surrogate + penalty, mask, "sequence")
    assert float(loss.detach()) == pytest.approx(-0.25)
    assert float(m["clipfrac"]) == 1.0
    # token mean of s_i: (2·√2 + 0.5)/3 = 1.109476
    assert float(m["ratio_mean"]) == pytest.approx((2 * math.sqrt(2) + 0.5) / 3)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_gspo_gradient_is_the_sequence_ratios():
    # One row, log π − log π_old = [ln 1.1, ln 0.9], A = 2, inside ε = 0.2:
    #   s = exp((ln 1.1 + ln 0.9)/2) = √0.99 = 0.994987
    #   GSPO:  ∂/∂logp_t −s·A = −A·s/|y| = −2·0.994987/2 = −0.994987 on both tokens
    #   per-token ratio (GRPO), sequence mean: ∂/∂logp_t = −A·ρ_t/|y| = [−1.1, −0.9]
    old = t([[0.0, 0.0]])
    mask = torch.ones(1, 2)
    for loss_fn, expected in [(gspo_loss, [-math.sqrt(0.99)] * 2), (grpo_loss, [-1.1, -0.9])]:
        logp = t([[math.log(1.1), math.log(0.9)]], grad=True)
        surrogate, _, _ = loss_fn(logp, old, old, t([2.0]), mask, clip_eps=0.2, kl_coef=0.0, kl_estimator="k3")
        aggregate(surrogate, mask, "sequence").backward()
        torch.testing.assert_close(logp.grad, t([expected]))


def test_gspo_kl_term_and_one_advantage_per_response():
    # k1 = logp − ref, β = 0.5: on row 0 [ln 2, 0] → penalty [0.5·ln 2, 0]
    logp, old, mask = _gspo_case()
    _, penalty, m = gspo_loss(logp, old, old, t([1.0, -1.0]), mask, clip_eps=0.2, kl_coef=0.5, kl_estimator="k1")
    torch.testing.assert_close(penalty[0].detach(), t([0.5 * math.log(2.0), 0.0]))
    with pytest.raises(ValueError, match="one advantage per response"):
        gspo_loss(logp, old, old, t([[1.0, 1.0], [1.0, 0.0]]), mask, clip_eps=0.2, kl_coef=0.0, kl_estimator="k3")


def test_grpo_loss_takes_per_token_advantages():
    # ratio 1: ℓ_t = −A_t, so A = [[1, −2], [0.5, pad]] gives ℓ = [[−1, 2], [−0.5, ·]]
    logp = t([[-1.0, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    surrogate, _, _ = grpo_loss(logp, logp, logp, t([[1.0, -2.0], [0.5, 0.0]]), mask, clip_eps=0.2, kl_coef=0.0,
                                kl_estimator="k3")
    torch.testing.assert_close(surrogate * mask, t([[-1.0, 2.0], [-0.5, 0.0]]))


def test_constant_length_normalizer_by_hand():
    # ℓ = [[1, 2, 3], [4, pad, pad]], L = 5:
    #   Dr. GRPO  Σ ℓ / (B·L) = 10 / (2·5) = 1.0
    #   sequence  (2 + 4)/2 = 3.0 ;  token 10/4 = 2.5 — the constant does not depend on lengths
    per_token = t([[1.0, 2.0, 3.0], [4.0, 50.0, 50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(aggregate(constant_length_normalized(per_token, 5), mask, "seq-mean-token-sum")) == 1.0
    assert float(aggregate(per_token, mask, "sequence")) == 3.0 and float(aggregate(per_token, mask, "token")) == 2.5
    with pytest.raises(ValueError, match="max_length must be ≥ 1"):
        constant_length_normalized(per_token, 0)
