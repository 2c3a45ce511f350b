import math

import pytest
import torch

from rlhfkit.losses.policy import (
    AGGREGATIONS,
    aggregate,
    entropy_bonus,
    explained_variance,
    grpo_loss,
    loss_units,
    ppo_policy_loss,
    reinforce_loss,
    truncated_importance_weights,
    value_loss,
)
from rlhfkit.ops.advantages import baseline_advantages


def t(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


# ---------------------------------------------------------------- aggregation

def test_aggregations_by_hand():
    # per-token losses [[1,2,3],[4,pad,pad]]
    per_token = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(aggregate(per_token, mask, "token")) == pytest.approx(10 / 4)
    assert float(aggregate(per_token, mask, "sequence")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(per_token, mask, "seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    with pytest.raises(ValueError, match="did you mean 'token'"):
        aggregate(per_token, mask, "tokens")


def test_micro_batches_normalized_by_the_minibatch_units_add_up_to_its_loss():
    per_token = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [5.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    assert float(loss_units(mask, "token")) == 6 and float(loss_units(mask, "sequence")) == 3
    for aggregation in AGGREGATIONS:
        units = loss_units(mask, aggregation)
        parts = (aggregate(per_token[:1], mask[:1], aggregation, normalizer=units)
                 + aggregate(per_token[1:], mask[1:], aggregation, normalizer=units))
        assert float(parts) == pytest.approx(float(aggregate(per_token, mask, aggregation))), aggregation


# ---------------------------------------------------------------- PPO clipped surrogate

def _ppo_case():
    # ε = 0.2. Real tokens (ratio ρ, advantage A); the padded one holds junk:
    #   (1.5, +1): min(1.5, 1.2) = 1.2    clipped   → ℓ = −1.2, ∂ℓ/∂logp = 0
    #   (1.5, −1): min(−1.5, −1.2) = −1.5 unclipped → ℓ = +1.5, ∂ℓ/∂logp = −Aρ = 1.5
    #   (1.0,  0):                                  → ℓ = 0,    ∂ℓ/∂logp = 0
    #   (0.5, −1): min(−0.5, −0.8) = −0.8 clipped   → ℓ = +0.8, ∂ℓ/∂logp = 0
    #   (0.5, +1): min(0.5, 0.8) = 0.5    unclipped → ℓ = −0.5, ∂ℓ/∂logp = −0.5
    # rows: [(1.5,+1), (1.5,−1), (1,0)] and [(0.5,−1), (0.5,+1), pad]
    old = t([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    logp = t([[-1 + math.log(1.5), -1 + math.log(1.5), 0.0],
              [-1 + math.log(0.5), -1 + math.log(0.5), 5.0]], grad=True)
    adv = t([[1.0, -1.0, 0.0], [-1.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask


def test_ppo_clipping_by_hand():
    logp, old, adv, mask = _ppo_case()
    per_token, metrics = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    loss = aggregate(per_token, mask, "token")
    # token mean over five real tokens: (−1.2 + 1.5 + 0 + 0.8 − 0.5)/5 = 0.12; clipfrac 2/5
    assert loss.item() == pytest.approx(0.6 / 5)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([[0.0, 1.5 / 5, 0.0], [0.0, -0.5 / 5, 0.0]]))
    assert float(metrics["clipfrac"]) == pytest.approx(2 / 5)
    assert float(metrics["ratio_mean"]) == pytest.approx((1.5 + 1.5 + 1 + 0.5 + 0.5) / 5)
    # approx KL = mean of (ρ − 1) − log ρ
    k3 = lambda r: (r - 1) - math.log(r)  # noqa: E731
    assert float(metrics["approx_kl"]) == pytest.approx((2 * k3(1.5) + 2 * k3(0.5)) / 5)
    assert all(not v.requires_grad for v in metrics.values())


def test_ppo_sequence_aggregation_weighs_rows_equally():
    logp, old, adv, mask = _ppo_case()
    per_token, _ = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    loss = aggregate(per_token, mask, "sequence")
    # row 0: (−1.2 + 1.5 + 0)/3 = 0.1 ; row 1: (0.8 − 0.5)/2 = 0.15 → 0.125
    assert loss.item() == pytest.approx(0.125)


def test_ppo_asymmetric_clip_higher():
    # ρ = 1.25, A = +1: clipped at 1.2 with ε = 0.2, not with ε_high = 0.28
    logp, old = t([[math.log(1.25)]], grad=True), t([[0.0]])
    adv, mask = t([[1.0]]), torch.ones(1, 1)
    per_token, m = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    loss = aggregate(per_token, mask, "token")
    assert loss.item() == pytest.approx(-1.2) and float(m["clipfrac"]) == 1.0
    per_token, m = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    loss = aggregate(per_token, mask, "token")
    assert loss.item() == pytest.approx(-1.25) and float(m["clipfrac"]) == 0.0


def test_ppo_old_logp_is_a_constant():
    # first epoch: old_logp is the same tensor as logp; ρ = 1 and ∂ℓ/∂logp = −A still
    logp = t([[-1.0, -2.0]], grad=True)
    per_token, _ = ppo_policy_loss(logp, logp, t([[2.0, -1.0]]), torch.ones(1, 2), clip_eps=0.2)
    aggregate(per_token, torch.ones(1, 2), "token").backward()
    torch.testing.assert_close(logp.grad, t([[-1.0, 0.5]]))


# ---------------------------------------------------------------- value loss

def test_value_clipping_by_hand():
    # ε = 0.2, old V = 0, V = 0.5 (so clip(V) = 0.2):
    #   R = 1: (0.5−1)² = 0.25 vs (0.2−1)² = 0.64 → ½·0.64 = 0.32, clipped, ∂/∂V = 0
    #   R = 0: (0.5−0)² = 0.25 vs (0.2−0)² = 0.04 → ½·0.25 = 0.125,        ∂/∂V = V−R = 0.5
    # token mean (0.32 + 0.125)/2 = 0.2225, vf_clipfrac = ½
    values = t([[0.5, 0.5, 3.0]], grad=True)
    old, returns = t([[0.0, 0.0, 0.0]]), t([[1.0, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    per_token, metrics = value_loss(values, old, returns, mask, clip_eps=0.2)
    loss = aggregate(per_token, mask, "token")
    assert loss.item() == pytest.approx(0.2225)
    loss.backward()
    torch.testing.assert_close(values.grad, t([[0.0, 0.25, 0.0]]))
    assert float(metrics["vf_clipfrac"]) == pytest.approx(0.5)


def test_explained_variance_by_hand():
    mask = torch.ones(1, 3)
    returns = t([[1.0, 2.0, 3.0]])
    # residual R − V = [0, 0, −1]: sample var ⅓; Var[R] = 1 → 1 − ⅓
    assert float(explained_variance(t([[1.0, 2.0, 4.0]]), returns, mask)) == pytest.approx(2 / 3)
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert float(explained_variance(t([[2.0, 2.0, 2.0]]), returns, mask)) == pytest.approx(0.0)
    assert math.isnan(float(explained_variance(returns, t([[1.0, 1.0, 1.0]]), mask)))


def test_entropy_bonus():
    entropy = t([[1.0, 3.0], [2.0, 50.0]], grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    per_token, metrics = entropy_bonus(entropy, mask, coef=0.01)
    loss = aggregate(per_token, mask, "token")
    assert loss.item() == pytest.approx(-0.02)  # −0.01 · mean(1, 3, 2)
    assert float(metrics["entropy"]) == pytest.approx(2.0)


# ---------------------------------------------------------------- GRPO

def test_grpo_on_policy_without_kl_is_minus_advantage():
    # ρ = 1 everywhere, β = 0: ℓ_t = −A_i. Advantages [1, −1], rows of 3 and 1 tokens.
    logp = t([[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]], grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = t([1.0, -1.0])
    surrogate, penalty, m = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, clip_eps=0.2,
                                      kl_coef=0.0, kl_estimator="k3")
    loss = aggregate(surrogate + penalty, mask, "token")
    assert loss.item() == pytest.approx((-3 + 1) / 4)           # token mean
    loss.backward()
    torch.testing.assert_close(logp.grad, t([[-0.25, -0.25, -0.25], [0.25, 0.0, 0.0]]))
    surrogate, penalty, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, clip_eps=0.2,
                                      kl_coef=0.0, kl_estimator="k3")
    loss = aggregate(surrogate + penalty, mask, "sequence")
    assert loss.item() == pytest.approx((-1 + 1) / 2)           # each response weighs ½


def test_grpo_kl_term_by_hand():
    # A = 0, π = ½, π_ref = ¼: k3 = ½ + log 2 − 1, ∂k3/∂logp = 1 − π_ref/π = ½; β = 0.1
    logp = t([[math.log(0.5)]], grad=True)
    ref = t([[math.log(0.25)]])
    surrogate, penalty, m = grpo_loss(logp, logp.detach(), ref, t([0.0]), torch.ones(1, 1), clip_eps=0.2,
                                      kl_coef=0.1, kl_estimator="k3")
    loss = aggregate(surrogate + penalty, torch.ones(1, 1), "token")
    assert loss.item() == pytest.approx(0.1 * (math.log(2) - 0.5))
    assert float(m["kl"]) == pytest.approx(math.log(2) - 0.5)
    loss.backward()
    assert float(logp.grad) == pytest.approx(0.05)


def test_grpo_clipping_matches_ppo_with_broadcast_advantages():
    logp, old, _, mask = _ppo_case()
    adv = t([1.0, -1.0])
    g_surrogate, g_penalty, g_m = grpo_loss(logp, old, old, adv, mask, clip_eps=0.2, kl_coef=0.0,
                                            kl_estimator="k3")
    g_loss = aggregate(g_surrogate + g_penalty, mask, "token")
    p_per_token, p_m = ppo_policy_loss(logp, old, t([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]), mask,
                                       clip_eps=0.2)
    p_loss = aggregate(p_per_token, mask, "token")
    assert g_loss.item() == pytest.approx(p_loss.item())
    assert float(g_m["clipfrac"]) == pytest.approx(float(p_m["clipfrac"]))


def test_truncated_importance_weights_by_hand():
    # π_old / μ per token: e^{0.5} = 1.6487, e^{−1} = 0.3679, e^{2} = 7.389 (capped at 2), padding ignored
    old = t([[-1.0, -2.0], [0.0, 0.0]], grad=True)
    sampler = t([[-1.5, -1.0], [-2.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    w, m = truncated_importance_weights(old, sampler, mask, cap=2.0)
    torch.testing.assert_close(w[mask.bool()], t([math.exp(0.5), math.exp(-1.0), 2.0]))
    assert not w.requires_grad  # a weight, never a path for the gradient
    assert float(m["is_weight_mean"]) == pytest.approx((math.exp(0.5) + math.exp(-1.0) + 2.0) / 3)
    assert float(m["is_capped_frac"]) == pytest.approx(1 / 3)
    # a cap of 1.5 also bounds the first token
    w, m = truncated_importance_weights(old, sampler, mask, cap=1.5)
    assert float(w[0, 0]) == pytest.approx(1.5) and float(m["is_capped_frac"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(old, sampler, mask, cap=0.0)


# ---------------------------------------------------------------- REINFORCE / RLOO / ReMax

def test_reinforce_by_hand_with_remax_baseline():
    # ReMax: sampled scores [1, 0], greedy-decode scores [0.5, 0.5] → A = [0.5, −0.5]
    adv = baseline_advantages(t([1.0, 0.0]), t([0.5, 0.5]))
    logp = t([[-1.0, -2.0], [-0.5, -9.0]], grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    # Σ logp per response = [−3, −0.5]; loss = mean(−0.5·−3, 0.5·−0.5) = (1.5 − 0.25)/2
    per_token, m = reinforce_loss(logp, adv, mask)
    loss = aggregate(per_token, mask, "seq-mean-token-sum")
    assert loss.item() == pytest.approx(0.625)
    loss.backward()
    # ∂/∂logp_{i,t} = −A_i / B on real tokens
    torch.testing.assert_close(logp.grad, t([[-0.25, -0.25], [0.25, 0.0]]))
    assert float(m["logp_sum_mean"]) == pytest.approx(-1.75)
